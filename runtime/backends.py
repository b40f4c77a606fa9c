"""The runtime's backends, chosen by name from one registry: ``ort-cpu`` and ``ort-cuda`` run an
export folder's graphs with ONNX Runtime, ``trt`` runs an engine folder's plans with TensorRT.

Making a runner verifies the files it will load (graph fingerprints, plan sidecars) once; loading
the session or plan is the runner's ``activate``.  The torch reference backend needs torch, so it
lives on the export side (``fluxrt.export.torch_runner``) and reaches a pipeline by injection:
``FluxPipeline.load(path, runners=torch_runners(folder))``.

The optional stages (``fluxrt.components.OPTIONAL_STAGES``: the VAE encoder, for image-to-image) take
their backend from the same choice; a folder that lacks one is refused by name when its runner is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from fluxrt.artifacts import EngineFolder, ExportFolder, ModelFolder
from fluxrt.components import OPTIONAL_STAGES, STAGES
from fluxrt.errors import EngineError, ExportError, InvalidInputError
from fluxrt.runner import Runner
from fluxrt.runtime.ort import MAX_CUDA_GRAPHS

TORCH_BACKEND = "torch"  # the reference backend: fluxrt.export.torch_runner, injected by the caller


@dataclass(frozen=True)
class BackendOptions:
    cuda_graph: bool = False  # ort-cuda: replay the transformer from CUDA graphs
    max_cuda_graphs: int = MAX_CUDA_GRAPHS  # shapes captured per runner

    def __post_init__(self) -> None:  # max_cuda_graphs is checked by the runner that uses it (OrtRunner)
        if not isinstance(self.cuda_graph, bool):
            raise InvalidInputError(f"cuda_graph must be True or False, got {self.cuda_graph!r}")


@dataclass(frozen=True)
class Backend:
    name: str
    folder_kind: str  # the folder it runs from: "export" or "engines"
    make: Callable[[ModelFolder, str, BackendOptions], Runner]


def ort_runner(backend: str) -> Callable[[ExportFolder, str, BackendOptions], Runner]:
    def make(folder: ExportFolder, name: str, options: BackendOptions) -> Runner:
        from fluxrt.runtime.ort import OrtRunner

        if backend == "ort-cpu" and folder.graph_precision(name) == "bf16":
            raise EngineError(f"{name}: {folder.root} holds bf16 graphs, which ONNX Runtime cannot run on the CPU "
                              f"(it has no bfloat16 kernels for Add and others there): run them with --backend "
                              f"ort-cuda, build TensorRT engines from them, or export fp32 or fp16 for the CPU")
        custom_ops = None
        if folder.record(name).get("attention") == "ort-kernels":
            from fluxrt.runtime.ort_ops import library_path

            custom_ops = library_path()
        return OrtRunner(folder.spec(name), folder.graph_precision(name), folder.verified_graph(name),
                         backend=backend, cuda_graph=options.cuda_graph and name == "transformer",
                         max_cuda_graphs=options.max_cuda_graphs, custom_ops=custom_ops)

    return make


def trt_runner(folder: EngineFolder, name: str, options: BackendOptions) -> Runner:
    from fluxrt.runtime.trt import TrtRunner

    return TrtRunner.from_engine_folder(folder, name)


BACKENDS = {b.name: b for b in (
    Backend("ort-cpu", "export", ort_runner("ort-cpu")),
    Backend("ort-cuda", "export", ort_runner("ort-cuda")),
    Backend("trt", "engines", trt_runner),
)}
DEFAULT_BACKEND = {"export": "ort-cpu", "engines": "trt"}


# what to do when a folder lacks an optional stage, by folder kind
MISSING_OPTIONAL = {
    "export": "export the VAE again with fluxrt export --components vae (it writes vae_decoder.onnx and "
              "vae_encoder.onnx)",
    "engines": "build its plan into this folder with fluxrt build EXPORT --out {root} --components vae_encoder "
               "--precision {precision}",
}


def check_optional(folder: ModelFolder, name: str) -> None:
    """Refuse an optional stage the folder has no graph (export folder) or plan (engine folder) of."""
    have = folder.components()
    if name in have:
        return
    what, error = ("export folder", ExportError) if folder.kind == "export" else ("engine folder", EngineError)
    kind = "graph" if folder.kind == "export" else "plan"
    remedy = MISSING_OPTIONAL[folder.kind].format(root=folder.root, precision=folder.precision)
    raise error(f"image-to-image needs the {name} stage, and {what} {folder.root} has no {name} {kind} (it has "
                f"{have}): {remedy}")


def make_runner(folder: ModelFolder, name: str, backend: str, options: BackendOptions = BackendOptions()) -> Runner:
    if backend == TORCH_BACKEND:
        raise InvalidInputError(f"backend 'torch' for {name} runs the checkpoint's torch modules, which live on the "
                                f"export side: pass runners=fluxrt.export.torch_runner.torch_runners(folder) instead")
    if backend not in BACKENDS:
        raise InvalidInputError(f"backend {backend!r} for {name} is not one of {list(BACKENDS) + [TORCH_BACKEND]}")
    b = BACKENDS[backend]
    if b.folder_kind != folder.kind:
        if folder.kind == "engines":
            raise InvalidInputError(f"engine folder {folder.root} holds TensorRT plans: backend for {name} must be "
                                    f"'trt', got {backend!r}")
        raise InvalidInputError(f"backend {backend!r} for {name} needs an engine folder (fluxrt build), "
                                f"{folder.root} is an export folder")
    if name in OPTIONAL_STAGES:
        check_optional(folder, name)
    return b.make(folder, name, options)


def stage_backends(folder: ModelFolder, backend: str | Mapping[str, str] | None,
                   stages: tuple[str, ...] = STAGES) -> dict[str, str]:
    """``backend`` (one name, a stage -> name mapping, or None for the folder's default) per stage of ``stages``
    (a mapping may name the optional stages too)."""
    default = DEFAULT_BACKEND[folder.kind]
    if backend is None or isinstance(backend, str):
        return {s: backend or default for s in stages}
    if not isinstance(backend, Mapping):
        raise InvalidInputError(f"backend must be a name or a mapping stage -> name, got {backend!r}")
    known = STAGES + OPTIONAL_STAGES
    unknown = sorted(set(backend) - set(known))
    if unknown:
        raise InvalidInputError(f"backend mapping names unknown stages {unknown}; stages are {list(known)}")
    return {s: backend.get(s, default) for s in stages}


def make_runners(folder: ModelFolder, backend: str | Mapping[str, str] | None = None,
                 options: BackendOptions = BackendOptions(), skip: tuple[str, ...] = (),
                 stages: tuple[str, ...] = STAGES) -> dict[str, Runner]:
    """One runner per stage of ``stages`` (the pipeline's, and optional ones asked for) not in ``skip``, each
    verified but not yet activated."""
    choice = stage_backends(folder, backend, stages)
    if options.cuda_graph and "transformer" in choice and "transformer" not in skip \
            and choice["transformer"] != "ort-cuda":
        raise InvalidInputError(f"cuda_graph replays the ort-cuda transformer; the transformer's backend is "
                                f"{choice['transformer']!r}")
    return {s: make_runner(folder, s, choice[s], options) for s in stages if s not in skip}
