"""fluxrt.runtime: the torch-free host loop around any backend.

    from fluxrt.runtime import FluxPipeline
    pipe = FluxPipeline.load("out/onnx", backend="ort-cpu")
    image = pipe("a lighthouse at dawn", height=512, width=512, seed=0).images[0]
"""

from fluxrt.runtime.pipeline import FluxPipeline, FluxPipelineOutput

__all__ = ["FluxPipeline", "FluxPipelineOutput"]
