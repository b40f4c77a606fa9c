"""Pick the TensorRT library: full TensorRT (``tensorrt``, version 10 or later) or TensorRT-RTX
(``tensorrt_rtx_bindings``).  Both have the same Builder / OnnxParser / Runtime API; TensorRT-RTX
also builds ahead of time for a named compute capability on a machine without a GPU.  The engine
builder and the runtime's TensorRT runner both start here, and a plan's sidecar records
:func:`library_info` so that the runtime refuses a plan of another library or version."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from fluxrt.errors import EngineError

# user-facing name -> (import name, pip extra)
LIBRARIES = {
    "tensorrt": ("tensorrt", "fluxrt[trt]"),
    "tensorrt-rtx": ("tensorrt_rtx_bindings", "fluxrt[trt-rtx]"),
}
MIN_TENSORRT_MAJOR = 10


def import_trt(prefer: str | None = None) -> ModuleType:
    """The TensorRT module: ``prefer`` names one of LIBRARIES; ``None`` tries tensorrt, then tensorrt-rtx."""
    if prefer is not None and prefer not in LIBRARIES:
        raise ValueError(f"TensorRT library {prefer!r} is not one of {list(LIBRARIES)}")
    names = [prefer] if prefer else list(LIBRARIES)
    tried = []
    for name in names:
        module_name, _ = LIBRARIES[name]
        try:
            module = importlib.import_module(module_name)
        except (ImportError, OSError) as e:  # OSError: the package is there but its shared libraries are not
            tried.append(f"{name} (import {module_name}: {e})")
            continue
        if name == "tensorrt" and major_version(module) < MIN_TENSORRT_MAJOR:
            tried.append(f"{name} (version {module.__version__}, need >= {MIN_TENSORRT_MAJOR})")
            continue
        return module
    extras = " or ".join(f"pip install '{LIBRARIES[n][1]}'" for n in names)
    raise EngineError(f"no usable TensorRT library; tried {'; '.join(tried)}. Install one: {extras}")


def major_version(module: ModuleType) -> int:
    return int(str(module.__version__).split(".")[0])


def library_name(trt: ModuleType) -> str:
    """``"tensorrt"`` or ``"tensorrt-rtx"`` for a module returned by :func:`import_trt`."""
    for name, (module_name, _) in LIBRARIES.items():
        if trt.__name__ == module_name:
            return name
    raise ValueError(f"module {trt.__name__!r} is not a TensorRT library; expected one of "
                     f"{[m for m, _ in LIBRARIES.values()]}")


def library_info(trt: ModuleType) -> dict:
    """Provenance of engines built or run with ``trt``: library name and version."""
    return {"library": library_name(trt), "version": str(trt.__version__)}


def is_rtx(trt: ModuleType) -> bool:
    return library_name(trt) == "tensorrt-rtx"


def make_logger(trt: ModuleType, echo: bool = False, prefix: str = "[fluxrt build]"):
    """A TensorRT logger that keeps errors for exception messages and echoes warnings if asked."""

    class CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = int(severity)
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if echo and level <= int(trt.ILogger.Severity.WARNING):
                print(f"{prefix} TensorRT {severity.name.lower()}: {msg}", file=sys.stderr, flush=True)

    return CollectingLogger()
