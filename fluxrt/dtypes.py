"""One dtype table: each element type's name in numpy (the name used everywhere in fluxrt), ONNX,
ONNX Runtime, torch and TensorRT, and bfloat16 on arrays that lack it.

numpy has bfloat16 and float8 through ml_dtypes (which onnx depends on); cupy has neither, so
device tensors of bfloat16 travel as uint16 bit patterns (``cast``, ``to_float32``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Array = Any  # numpy.ndarray, or a device array (cupy.ndarray) on GPU backends


@dataclass(frozen=True)
class DType:
    name: str  # numpy / ml_dtypes name, fluxrt's own
    onnx: int  # onnx.TensorProto element type
    ort: str  # ONNX Runtime's type string
    torch: str | None  # attribute of the torch module
    trt: str | None  # TensorRT DataType member
    cupy: str | None  # how a cupy array holds it (None: not at all)


DTYPES = {d.name: d for d in (
    DType("float32", 1, "tensor(float)", "float32", "FLOAT", "float32"),
    DType("float16", 10, "tensor(float16)", "float16", "HALF", "float16"),
    DType("bfloat16", 16, "tensor(bfloat16)", "bfloat16", "BF16", "uint16"),
    DType("float64", 11, "tensor(double)", "float64", None, "float64"),
    DType("float8_e4m3fn", 17, "tensor(float8e4m3fn)", "float8_e4m3fn", "FP8", "uint8"),
    DType("int8", 3, "tensor(int8)", "int8", "INT8", "int8"),
    DType("uint8", 2, "tensor(uint8)", "uint8", "UINT8", "uint8"),
    DType("int32", 6, "tensor(int32)", "int32", "INT32", "int32"),
    DType("int64", 7, "tensor(int64)", "int64", "INT64", "int64"),
    DType("bool", 9, "tensor(bool)", "bool", "BOOL", "bool"),
)}
# the floating dtype of each activation precision
PRECISION_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DTYPE_PRECISION = {v: k for k, v in PRECISION_DTYPE.items()}
BY_ONNX = {d.onnx: d.name for d in DTYPES.values()}
BY_ORT = {d.ort: d.name for d in DTYPES.values()}
BY_TRT = {d.trt: d.name for d in DTYPES.values() if d.trt}


def from_trt(dtype) -> str:
    """fluxrt's name of a ``tensorrt.DataType`` (unknown members: their lower-case name)."""
    return BY_TRT.get(dtype.name, dtype.name.lower())


def from_onnx(elem_type: int) -> str:
    return BY_ONNX.get(elem_type, f"onnx-type-{elem_type}")


def numpy_dtype(name: str) -> np.dtype:
    if name in ("bfloat16", "float8_e4m3fn"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def array_module(x: Array):
    """numpy or cupy, whichever owns ``x``."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def is_bf16_bits(x: Array) -> bool:
    return array_module(x) is not np and str(x.dtype) == "uint16"


def as_bits(x: Array) -> Array:
    """``x`` in the form a device array holds it: bfloat16 (ml_dtypes on the host, or a cupy build with
    ml_dtypes' bfloat16) as a uint16 view of the same bits; any other array unchanged."""
    if str(x.dtype) == "bfloat16":
        return x.view(array_module(x).uint16)
    return x


def to_cupy(x: Array) -> Array:
    """``x`` as a cupy array, bfloat16 as its uint16 bits: what every CUDA runner binds. A host bfloat16 array
    copied as it is would become either a cupy bfloat16 array or a value cast into a uint16 buffer, and
    the graph would read other numbers than the ones given."""
    import cupy

    return cupy.asarray(as_bits(x))


def to_float32(x: Array) -> Array:
    """float32 view of any floating array, bf16 bit patterns included."""
    if is_bf16_bits(x):
        xp = array_module(x)
        return (x.astype(xp.uint32) << 16).view(xp.float32)
    return x.astype(np.float32, copy=False)


def cast(x: Array, dtype: str) -> Array:
    """``x`` in ``dtype``; bfloat16 on a device array gives round-to-nearest-even bit patterns, and a device
    array of bfloat16 bits is read as the numbers it holds (a bf16 T5's output fed to an fp16 transformer),
    never as the integers of its bits."""
    xp = array_module(x)
    if is_bf16_bits(x):
        return x if dtype == "bfloat16" else to_float32(x).astype(dtype, copy=False)
    if dtype != "bfloat16":
        return x.astype(dtype, copy=False)
    if xp is np:
        return x.astype(numpy_dtype("bfloat16"))
    bits = xp.ascontiguousarray(x.astype(xp.float32)).view(xp.uint32)
    rounded = bits + xp.uint32(0x7FFF) + ((bits >> 16) & xp.uint32(1))
    return (rounded >> 16).astype(xp.uint16)
