"""The sampling loop's host work between two transformer calls on a GPU, at FLUX.1's 1024x1024 shape ([1, 4096,
64], bf16 velocity): the array operations it was (upcast, finiteness check, Euler step, bf16 cast of the next
input: about fifteen cupy launches) against runtime/loop.py's fused_step (one kernel and a 4-byte flag read).
500 calls each, twice, after 20 warm-up calls; host milliseconds per step.

    PYTHONPATH=<fluxrt package> python3 docs/benchmarks/h200-2026-12-04/euler_step.py
"""

import time

import cupy
import numpy as np

from fluxrt import dtypes
from fluxrt.runtime import loop, sampling

lat = cupy.random.standard_normal((1, 4096, 64), dtype=cupy.float32)
v = dtypes.cast(cupy.random.standard_normal((1, 4096, 64), dtype=cupy.float32), "bfloat16")


def old():
    vel = dtypes.to_float32(v)
    bool(cupy.isfinite(dtypes.to_float32(v)).all())
    return dtypes.cast(sampling.euler_step(lat, vel, 0.7, 0.65), "bfloat16")


def new():
    _, n, f = loop.fused_step(v, lat, np.float32(-0.05), "bfloat16")
    int(f.get()[0])
    return n


for fn in (old, new, old, new):
    for _ in range(20):
        fn()
    cupy.cuda.Device().synchronize()
    t = time.perf_counter()
    for _ in range(500):
        fn()
    cupy.cuda.Device().synchronize()
    print(fn.__name__, (time.perf_counter() - t) / 500 * 1e3, "ms per step")
