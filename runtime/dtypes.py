"""bfloat16 on arrays that lack it.  cupy has no bfloat16, so device tensors of that type
travel as uint16 bit patterns; numpy uses ml_dtypes' bfloat16 (which onnx depends on)."""

from __future__ import annotations

import numpy as np

from fluxrt.runtime.runners import Array, array_module


def is_bf16_bits(x: Array) -> bool:
    return array_module(x) is not np and str(x.dtype) == "uint16"


def to_float32(x: Array) -> Array:
    """float32 view of any floating array, bf16 bit patterns included."""
    if is_bf16_bits(x):
        xp = array_module(x)
        return (x.astype(xp.uint32) << 16).view(xp.float32)
    return x.astype(np.float32, copy=False)


def cast(x: Array, dtype: str) -> Array:
    """``x`` in ``dtype``; bfloat16 on a device array gives round-to-nearest-even bit patterns."""
    xp = array_module(x)
    if dtype != "bfloat16":
        return x.astype(dtype, copy=False)
    if xp is np:
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16)
    if is_bf16_bits(x):
        return x
    bits = xp.ascontiguousarray(x.astype(xp.float32)).view(xp.uint32)
    rounded = bits + xp.uint32(0x7FFF) + ((bits >> 16) & xp.uint32(1))
    return (rounded >> 16).astype(xp.uint16)
