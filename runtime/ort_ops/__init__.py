"""fluxrt's ONNX Runtime custom-op library (``fluxrt_ops.cu`` here): the transformer's element-wise
work in four fused kernels (NormRope, AdaLayerNorm, GatedResidual, BiasGelu), for graphs exported
with ``--attention ort-kernels``.  This module finds and checks a built library; ``build.py`` beside
it compiles one (``fluxrt ort-ops build`` / ``make ort-ops``).

    FLUXRT_ORT_OPS=/path/libfluxrt_ort_ops.so   # where the runtime looks first

Any ONNX Runtime from API 17 (1.17) on loads the library.  A build with CUDA kernels (float32,
float16, bfloat16) also has the float32 CPU kernels, which run the graph on ``ort-cpu``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from pathlib import Path

from fluxrt.components import ORT_OPS_DOMAIN as DOMAIN
from fluxrt.errors import EngineError

SOURCE = Path(__file__).parent / "fluxrt_ops.cu"
CUDNN_SOURCE = Path(__file__).parent / "fluxrt_cudnn.cpp"  # Fp8Attention's cuDNN calls (CUDA builds)
SOURCES = (SOURCE, CUDNN_SOURCE, Path(__file__).parent / "fluxrt_cudnn.h")
LIBRARY_NAME = "libfluxrt_ort_ops.so"
ENV_LIBRARY = "FLUXRT_ORT_OPS"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fluxrt"


def source_digest() -> str:
    digest = hashlib.sha256()
    for path in SOURCES:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def default_library() -> Path:
    """Where a build goes by default: keyed by the source, so an edited source is never served by a
    stale build."""
    return cache_dir() / f"ort-ops-{source_digest()}" / LIBRARY_NAME


def library_path() -> Path:
    """The library the runtime loads: $FLUXRT_ORT_OPS, else the default build location."""
    env = os.environ.get(ENV_LIBRARY)
    path = Path(env) if env else default_library()
    if not path.is_file():
        where = f"${ENV_LIBRARY}={env}" if env else str(path)
        raise EngineError(f"the graph uses fluxrt's ONNX Runtime kernels (domain {DOMAIN!r}, exported with "
                          f"--attention ort-kernels) and their library is not built: {where} does not exist. "
                          f"Build it with `fluxrt ort-ops build` (or `make ort-ops`), or point {ENV_LIBRARY} at a build")
    return path


def library_devices(path: Path) -> set[str]:
    """{"cpu"} or {"cpu", "cuda"}: the kernels compiled into the library at ``path``."""
    try:
        lib = ctypes.CDLL(str(path))
        fn = lib.FluxrtOpsDevices
    except (OSError, AttributeError) as e:
        raise EngineError(f"{path} is not a fluxrt ONNX Runtime op library: {e}") from None
    fn.restype = ctypes.c_char_p
    return set(fn().decode().split(","))


def check_library(path: Path, device: str) -> Path:
    devices = library_devices(path)
    if device not in devices:
        raise EngineError(f"{path} was built without {device} kernels (it has {sorted(devices)}): rebuild it with "
                          f"`fluxrt ort-ops build`{' on a machine with nvcc' if device == 'cuda' else ''}")
    return path
