"""fluxrt's ONNX Runtime custom-op library (runtime/ort_ops/fluxrt_ops.cu): the transformer's
element-wise work in three fused kernels, for graphs exported with ``--attention ort-kernels``.

    fluxrt ort-ops build            # or: make ort-ops
    FLUXRT_ORT_OPS=/path/libfluxrt_ort_ops.so   # where the runtime looks first

The library compiles against ONNX Runtime's C API headers, which the Python wheels do not ship:
they come from Debian's ``libonnxruntime-dev`` package (downloaded once, checked against a pinned
SHA-256, cached). Any ONNX Runtime from API 17 (1.17) on loads the library. With ``nvcc`` the CUDA
kernels (float32, float16, bfloat16) are compiled in beside the float32 CPU kernels; without it
(``cuda=False``) the library has the CPU kernels only, which run the graph on ``ort-cpu``.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from fluxrt.components import ORT_OPS_DOMAIN as DOMAIN
from fluxrt.errors import EngineError
SOURCE = Path(__file__).parent / "ort_ops" / "fluxrt_ops.cu"
LIBRARY_NAME = "libfluxrt_ort_ops.so"
ENV_LIBRARY = "FLUXRT_ORT_OPS"
# ONNX Runtime 1.21's C API headers (API 21; the library asks for API 17 at run time)
HEADERS_DEB = ("http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
               "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
# every data-centre and desk GPU generation from Ampere on; override with FLUXRT_CUDA_ARCHS="90;120"
DEFAULT_ARCHS = ("80", "86", "89", "90", "100", "120")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fluxrt"


def source_digest() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def default_library() -> Path:
    """Where ``build()`` puts the library by default: keyed by the source, so an edited source
    is never served by a stale build."""
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


def _read_ar(data: bytes) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise EngineError("the downloaded ONNX Runtime header package is not a .deb (ar) archive")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def ort_headers() -> Path:
    """ONNX Runtime's C API headers, downloaded and unpacked once into the cache."""
    url, digest = HEADERS_DEB
    include = cache_dir() / f"onnxruntime-headers-{digest[:12]}" / "include"
    if (include / "onnxruntime_c_api.h").is_file():
        return include
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            data = response.read()
    except OSError as e:
        raise EngineError(f"could not download ONNX Runtime's C API headers from {url}: {e}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != digest:
        raise EngineError(f"{url} has SHA-256 {got}, expected {digest}: refusing to build against it")
    payload = next((v for k, v in _read_ar(data).items() if k.startswith("data.tar")), None)
    if payload is None:
        raise EngineError(f"{url} has no data.tar member")
    include.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=include.parent))
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and "/usr/include/onnxruntime/" in f"/{m.name.lstrip('./')}"]
        for m in members:
            target = tmp / Path(m.name).name
            target.write_bytes(tar.extractfile(m).read())
    if not (tmp / "onnxruntime_c_api.h").is_file():
        raise EngineError(f"{url} does not contain onnxruntime_c_api.h")
    try:
        os.replace(tmp, include)
    except OSError:  # another build got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return include


def compile_command(include: Path, out: Path, cuda: bool, archs: tuple[str, ...]) -> list[str]:
    if cuda:
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
        return ["nvcc", "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-I", str(include),
                *gencode, "-o", str(out), str(SOURCE)]
    cxx = os.environ.get("CXX", "g++")
    return [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-DFLUXRT_CPU_ONLY", "-x", "c++",
            "-I", str(include), "-o", str(out), str(SOURCE)]


def build(out: str | Path | None = None, cuda: bool | None = None, archs: tuple[str, ...] | None = None) -> Path:
    """Compile the library to ``out`` (default: ``default_library()``) and return its path.
    ``cuda``: None = with CUDA kernels when nvcc is on the PATH; True = require nvcc."""
    out = Path(out) if out is not None else default_library()
    have_nvcc = shutil.which("nvcc") is not None
    if cuda is None:
        cuda = have_nvcc
    if cuda and not have_nvcc:
        raise EngineError("building fluxrt's ONNX Runtime CUDA kernels needs nvcc (the CUDA toolkit) on the PATH; "
                          "pass --cpu-only for the CPU kernels alone")
    if not cuda and shutil.which(os.environ.get("CXX", "g++")) is None:
        raise EngineError(f"building fluxrt's ONNX Runtime kernels needs a C++ compiler: {os.environ.get('CXX', 'g++')} "
                          f"is not on the PATH (set CXX)")
    if archs is None:
        env = os.environ.get("FLUXRT_CUDA_ARCHS")
        archs = tuple(a for a in env.replace(",", ";").split(";") if a) if env else DEFAULT_ARCHS
    bad = [a for a in archs if not a.isdigit()]
    if bad or not archs:
        raise EngineError(f"CUDA architectures must be compute capabilities like '90', got {list(archs)}")
    include = ort_headers()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    cmd = compile_command(include, tmp, cuda, tuple(archs))
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise EngineError(f"compiling {SOURCE.name} failed ({' '.join(cmd[:1])} exit {result.returncode}):\n"
                          f"{(result.stderr or result.stdout)[-4000:]}")
    os.replace(tmp, out)
    return out
