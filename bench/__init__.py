"""fluxrt.bench: benchmarks, apart from the stages they measure (they may import every stage;
no stage imports them).  ``pipelines.py``: ``fluxrt bench``, each stage of the runtime's pipeline over
export or engine folders; ``synthetic.py``: ``fluxrt bench-synthetic``, full-size FLUX.1-dev with
random weights on a GPU, torch eager / torch.compile / ONNX Runtime side by side."""
