"""Compile fluxrt's ONNX Runtime op library: CUDA kernels with nvcc, the CPU kernels with the C++
compiler, against ONNX Runtime's C API headers (which the Python wheels do not ship).

The headers come, in this order, from
1. a folder the user names: ``include`` (``fluxrt ort-ops build --ort-include DIR``) or ``$FLUXRT_ORT_INCLUDE``;
2. an installed ONNX Runtime development package (``/usr/include/onnxruntime``, ``/usr/local/include/onnxruntime``,
   ``$CONDA_PREFIX/include/onnxruntime``);
3. the system's package client: ``apt-get download libonnxruntime-dev`` from the sources apt is configured
   with, its SHA-256 checked against the one apt's signed package index gives for that version, unpacked
   with ``dpkg-deb`` into fluxrt's cache (reused by later builds).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from fluxrt.errors import EngineError
from fluxrt.files import atomic_path, sha256_file
from fluxrt.runtime.ort_ops import CUDNN_SOURCE, SOURCE, cache_dir, default_library

ENV_INCLUDE = "FLUXRT_ORT_INCLUDE"
HEADER = "onnxruntime_c_api.h"
DEV_PACKAGE = "libonnxruntime-dev"
# every data-centre and desk GPU generation from Ampere on; override with FLUXRT_CUDA_ARCHS="90;120"
DEFAULT_ARCHS = ("80", "86", "89", "90", "100", "120")
HOW_TO = (f"name a folder holding {HEADER} with --ort-include DIR or ${ENV_INCLUDE}, or install ONNX Runtime's "
          f"development package (Debian/Ubuntu: {DEV_PACKAGE})")


def installed_locations() -> list[Path]:
    places = [Path("/usr/include/onnxruntime"), Path("/usr/local/include/onnxruntime")]
    if os.environ.get("CONDA_PREFIX"):
        places.append(Path(os.environ["CONDA_PREFIX"]) / "include" / "onnxruntime")
    return places


def headers_cache() -> Path:
    return cache_dir() / "onnxruntime-headers"


def ort_headers(include: str | Path | None = None) -> Path:
    """The folder holding ONNX Runtime's C API headers (see the module doc for the order)."""
    named = include if include is not None else os.environ.get(ENV_INCLUDE)
    if named:
        where = "--ort-include" if include is not None else f"${ENV_INCLUDE}"
        for folder in (Path(named), Path(named) / "onnxruntime"):
            if (folder / HEADER).is_file():
                return folder
        raise EngineError(f"{where} {named}: no {HEADER} there (nor in its onnxruntime/ subfolder)")
    for folder in installed_locations() + [headers_cache()]:
        if (folder / HEADER).is_file():
            return folder
    return fetch_with_apt(headers_cache())


def run_tool(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    except OSError as e:
        raise EngineError(f"{what}: could not run {cmd[0]} ({e}); {HOW_TO}") from None
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise EngineError(f"{what}: `{' '.join(cmd)}` failed ({message[-1] if message else 'no message'}); {HOW_TO}")
    return result.stdout


def index_hashes(package: str, version: str, arch: str) -> set[str]:
    """SHA-256 sums apt's (signed) package index lists for ``package`` ``version`` on ``arch``."""
    out = run_tool(["apt-cache", "show", f"{package}={version}"], f"looking up {package} {version}")
    hashes = set()
    for stanza in out.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace())
        if fields.get("Version") == version and fields.get("Architecture") in (arch, "all") and "SHA256" in fields:
            hashes.add(fields["SHA256"].strip())
    return hashes


def fetch_with_apt(target: Path) -> Path:
    """Download the development package with apt, check it against apt's index, unpack its headers."""
    what = "getting ONNX Runtime's C API headers with the system's package client"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise EngineError(f"no ONNX Runtime C API headers found and no apt-get/dpkg-deb to fetch them; {HOW_TO}")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".onnxruntime-headers-", dir=target.parent))
    try:
        run_tool(["apt-get", "download", DEV_PACKAGE], what, cwd=work)
        debs = sorted(work.glob(f"{DEV_PACKAGE}_*.deb"))
        if len(debs) != 1:
            raise EngineError(f"{what}: apt-get download left {[d.name for d in debs]} in {work}, expected one .deb")
        version = run_tool(["dpkg-deb", "-f", str(debs[0]), "Version"], what).strip()
        arch = run_tool(["dpkg-deb", "-f", str(debs[0]), "Architecture"], what).strip()
        want, got = index_hashes(DEV_PACKAGE, version, arch), sha256_file(debs[0])
        if got not in want:
            raise EngineError(f"{what}: {debs[0].name} has SHA-256 {got}, but apt's index lists "
                              f"{sorted(want) or 'none'} for {DEV_PACKAGE} {version} ({arch}): refusing to build "
                              f"against it")
        run_tool(["dpkg-deb", "-x", str(debs[0]), str(work / "root")], what)
        headers = work / "root" / "usr" / "include" / "onnxruntime"
        if not (headers / HEADER).is_file():
            raise EngineError(f"{what}: {debs[0].name} does not contain usr/include/onnxruntime/{HEADER}")
        try:
            os.replace(headers, target)
        except OSError:  # another build got there first
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


CUBLAS_HEADER = "cublasLt.h"


def toolkit_includes() -> list[Path]:
    """Where the CUDA toolkit nvcc belongs to keeps its headers (nvcc searches these itself)."""
    places = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        places.append(Path(nvcc).resolve().parent.parent / "include")
    return places + [Path("/usr/local/cuda/include"), Path("/usr/include")]


def cublas_flags() -> list[str]:
    """nvcc flags for cuBLASLt (the FP8 linears' matrix products): none beyond the library when the CUDA
    toolkit has it, else the headers and library of an installed ``nvidia-cublas`` wheel (rpath set, so the
    built library finds it at run time)."""
    if any((folder / CUBLAS_HEADER).is_file() for folder in toolkit_includes()):
        return ["-lcublasLt"]
    import importlib.util

    spec = importlib.util.find_spec("nvidia")  # the namespace package of NVIDIA's pip wheels
    roots = [Path(p) for p in spec.submodule_search_locations or []] if spec else []
    for root in roots:
        for sub in sorted(root.glob("cu*"), reverse=True):
            libs = sorted((sub / "lib").glob("libcublasLt.so*"))
            if (sub / "include" / CUBLAS_HEADER).is_file() and libs:
                lib = sub / "lib"
                return ["-I", str(sub / "include"), "-L", str(lib), f"-l:{libs[0].name}", "-Xlinker", f"-rpath={lib}"]
    raise EngineError(f"fluxrt's CUDA kernels use cuBLASLt for the FP8 linears, and {CUBLAS_HEADER} is in neither the "
                      f"CUDA toolkit ({', '.join(str(p) for p in toolkit_includes())}) nor an installed nvidia-cublas "
                      f"wheel: install cuBLAS (the toolkit's libcublas development files, or `pip install "
                      f"nvidia-cublas`), or build the CPU kernels alone with --cpu-only")


def nvidia_wheel_includes() -> list[Path]:
    """The include folders of NVIDIA's pip wheels (``nvidia/<library>/include``, ``nvidia/cu13/include``)."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = [Path(p) for p in spec.submodule_search_locations or []] if spec else []
    return [sub / "include" for root in roots for sub in sorted(root.iterdir(), reverse=True) if (sub / "include").is_dir()]


def frontend_includes() -> list[Path]:
    """Where the cuDNN frontend's headers may be: $CUDNN_FRONTEND_INCLUDE, the nvidia-cudnn-frontend wheel's
    ``include`` folder, the CUDA toolkit."""
    places = [Path(os.environ["CUDNN_FRONTEND_INCLUDE"])] if os.environ.get("CUDNN_FRONTEND_INCLUDE") else []
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        places.append(Path(distribution("nvidia-cudnn-frontend").locate_file("include")))
    except PackageNotFoundError:
        pass
    return places + toolkit_includes()


def header_folder(header: str, places: list[Path], what: str, install: str) -> Path:
    for folder in places:
        if (folder / header).is_file():
            return folder
    raise EngineError(f"fluxrt's CUDA kernels run FP8 attention on {what}, and {header} is in none of "
                      f"{[str(p) for p in places]}: {install}, or build the CPU kernels alone with --cpu-only")


def cudnn_compile_command(obj: Path) -> list[str]:
    """The host compiler's command for Fp8Attention's cuDNN part (fluxrt_cudnn.cpp) to ``obj``: the cuDNN frontend
    (header-only) with cuDNN opened at run time, so only cuDNN's, the frontend's, NVRTC's and CUDA's headers are
    needed here. -O1: the frontend's templates take minutes at -O2 for no run-time gain (it builds graphs)."""
    wheels = nvidia_wheel_includes()
    folders = [
        header_folder("cudnn_frontend.h", frontend_includes(), "cuDNN", "pip install nvidia-cudnn-frontend"),
        header_folder("cudnn.h", toolkit_includes() + wheels, "cuDNN", "pip install nvidia-cudnn-cu13 (or -cu12)"),
        header_folder("nvrtc.h", toolkit_includes() + wheels, "cuDNN (its frontend includes NVRTC's header)",
                      "install the CUDA toolkit's NVRTC or pip install nvidia-cuda-nvrtc"),
        header_folder("cuda_runtime.h", toolkit_includes() + wheels, "CUDA", "install the CUDA toolkit"),
    ]
    cxx = os.environ.get("CXX", "g++")
    flags = [f for folder in dict.fromkeys(folders) for f in ("-I", str(folder))]
    return [cxx, "-O1", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-DNV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING",
            *flags, "-c", "-o", str(obj), str(CUDNN_SOURCE)]


def compile_command(include: Path, out: Path, cuda: bool, archs: tuple[str, ...], cudnn_obj: Path | None = None
                    ) -> list[str]:
    if cuda:
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
        return ["nvcc", "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-I", str(include),
                *gencode, "-o", str(out), str(SOURCE), str(cudnn_obj), "-ldl", *cublas_flags()]
    cxx = os.environ.get("CXX", "g++")
    return [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-DFLUXRT_CPU_ONLY", "-x", "c++",
            "-I", str(include), "-o", str(out), str(SOURCE)]


def build(out: str | Path | None = None, cuda: bool | None = None, archs: tuple[str, ...] | None = None,
          include: str | Path | None = None) -> Path:
    """Compile the library to ``out`` (default: ``default_library()``) and return its path.
    ``cuda``: None = with CUDA kernels when nvcc is on the PATH; True = require nvcc.
    ``include``: ONNX Runtime's C API header folder (default: see :func:`ort_headers`)."""
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
    headers = ort_headers(include)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(prefix="fluxrt-ort-ops-") as work:
        cudnn_obj = Path(work) / "fluxrt_cudnn.o"
        if cuda:
            run_compile(cudnn_compile_command(cudnn_obj), CUDNN_SOURCE.name)
        run_compile(compile_command(headers, tmp, cuda, tuple(archs), cudnn_obj), SOURCE.name)
    return out


def run_compile(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise EngineError(f"compiling {what} failed ({cmd[0]} exit {result.returncode}):\n"
                          f"{(result.stderr or result.stdout)[-4000:]}")
