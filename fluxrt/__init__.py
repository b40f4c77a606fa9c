"""fluxrt: deploy FLUX.1 checkpoints through ONNX and TensorRT.

The pipeline lives in three sibling folders mapped into this namespace: ``fluxrt.export`` (torch ->
ONNX), ``fluxrt.engines`` (ONNX -> TensorRT plans) and ``fluxrt.runtime`` (graphs or plans -> images,
no torch), with the benchmarks in ``fluxrt.bench``.  The modules directly in this package are the
layer all of them share and which imports none of them (docs/architecture.md), plus the CLI.
"""

__version__ = "0.1.0"
