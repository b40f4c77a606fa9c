"""fluxrt.dtypes: bfloat16 on arrays that lack it."""

from __future__ import annotations

import numpy as np
import pytest

from fluxrt import dtypes


def test_bfloat16_travels_as_its_bits():
    """A host bfloat16 array becomes the uint16 view of its bits (what a CUDA runner binds); the bits are
    bfloat16's round-to-nearest-even encoding of the values, read back exactly."""
    values = np.array([1.0, -2.5, 3.140625, 65504.0, 1e-3, -0.0], dtype=np.float32)
    bf16 = values.astype(dtypes.numpy_dtype("bfloat16"))
    bits = dtypes.as_bits(bf16)
    assert bits.dtype == np.uint16 and bits.shape == values.shape
    assert bits.tolist() == [0x3F80, 0xC020, 0x4049, 0x4780, 0x3A83, 0x8000]
    assert np.shares_memory(bits, bf16)  # a view: nothing copied
    assert np.array_equal((bits.astype(np.uint32) << 16).view(np.float32), bf16.astype(np.float32))


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "uint16"])
def test_other_dtypes_pass_unchanged(dtype):
    x = np.arange(6, dtype=dtype).reshape(2, 3)
    assert dtypes.as_bits(x) is x
