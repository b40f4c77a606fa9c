"""fluxrt: deploy FLUX.1 checkpoints through ONNX and TensorRT.

The pipeline lives in three sibling folders mapped into this namespace:
``fluxrt.export`` (torch -> ONNX), ``fluxrt.engines`` (ONNX -> TensorRT plans)
and ``fluxrt.runtime`` (plans -> images, no torch).
"""

__version__ = "0.1.0"
