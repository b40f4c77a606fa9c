"""Build one component's TensorRT plan from its ONNX graph: ``PlanFromOnnx``, as a function.

The network is strongly typed, so every tensor's precision is the ONNX graph's own (an fp16
export gives an fp16 engine; FP8 Q/DQ nodes stay where the exporter put them).  The parsed
network is checked against the component's tensor spec before anything is built, and the
plan is written under a temporary name and renamed, so a failed or interrupted build never
leaves a half file.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Iterable

from fluxrt.components import ACT, ComponentSpec, ModelDims, ShapeEnvelope
from fluxrt.dtypes import DTYPE_PRECISION as ACT_PRECISIONS
from fluxrt.dtypes import from_trt
from fluxrt.engines.profiles import profile_shapes
from fluxrt.errors import EngineError
from fluxrt.files import atomic_write_bytes
from fluxrt.trt import import_trt, is_rtx, library_info, make_logger


def log(msg: str) -> None:
    print(f"[fluxrt build] {msg}", file=sys.stderr, flush=True)


def make_progress_monitor(trt: ModuleType, label: str, max_depth: int = 2):
    """Prints the builder's phases (the outer ``max_depth`` levels) with their durations."""

    class PhasePrinter(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._depth: dict[str, int] = {}
            self._start: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self._depth[phase_name] = depth
                self._start[phase_name] = time.perf_counter()
            if depth < max_depth:
                log(f"{label}: {'  ' * depth}{phase_name} ({num_steps} steps)")

        def phase_finish(self, phase_name):
            with self._lock:
                depth = self._depth.pop(phase_name, 0)
                elapsed = time.perf_counter() - self._start.pop(phase_name, time.perf_counter())
            if depth < max_depth:
                log(f"{label}: {'  ' * depth}{phase_name} done in {elapsed:.1f}s")

        def step_complete(self, phase_name, step):
            return True  # never cancel

    return PhasePrinter()


def parser_errors(parser) -> list[str]:
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        where = f" (node {e.node()} {e.node_name()!r}, op {e.node_operator()})" if e.node() >= 0 else ""
        out.append(f"{e.code().name}: {e.desc()}{where}")
    return out


def network_io(network, profile=None) -> dict:
    """Names, dtypes and shapes (-1: dynamic) of a network's inputs and outputs, with the
    profile's (min, opt, max) of each input, read back from TensorRT's profile object."""
    inputs = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        entry = {"name": t.name, "dtype": from_trt(t.dtype), "shape": list(t.shape)}
        if profile is not None:
            entry["profile"] = [list(s) for s in profile.get_shape(t.name)]
        inputs.append(entry)
    outputs = []
    for i in range(network.num_outputs):
        t = network.get_output(i)
        outputs.append({"name": t.name, "dtype": from_trt(t.dtype), "shape": list(t.shape)})
    return {"inputs": inputs, "outputs": outputs}


def check_network(io: dict, spec: ComponentSpec, onnx_path: Path) -> str:
    """Check a parsed network against ``spec``; return the graph's precision (fp32/fp16/bf16)."""
    what = f"{spec.name}: {onnx_path}"
    for kind, wanted in (("inputs", spec.input_names), ("outputs", spec.output_names)):
        got = [t["name"] for t in io[kind]]
        if sorted(got) != sorted(wanted):
            missing = [n for n in wanted if n not in got]
            extra = [n for n in got if n not in wanted]
            raise EngineError(f"{what} has {kind} {got}, expected {wanted} (missing {missing}, unexpected {extra}); "
                              f"is it the {spec.name} graph?")
    tensors = {t["name"]: t for t in io["inputs"] + io["outputs"]}
    act_dtypes = set()
    for t in spec.inputs + spec.outputs:
        got = tensors[t.name]
        if t.dtype == ACT:
            if got["dtype"] not in ACT_PRECISIONS:
                raise EngineError(f"{what}: tensor {t.name!r} has dtype {got['dtype']}, expected one of "
                                  f"{list(ACT_PRECISIONS)}")
            act_dtypes.add(got["dtype"])
        elif got["dtype"] != t.dtype:
            raise EngineError(f"{what}: tensor {t.name!r} has dtype {got['dtype']}, expected {t.dtype}")
        check_fixed_dims(what, t.name, got["shape"], t.shape)
    if len(act_dtypes) != 1:
        raise EngineError(f"{what}: floating tensors mix dtypes {sorted(act_dtypes)}; expected one precision")
    return ACT_PRECISIONS[act_dtypes.pop()]


def check_fixed_dims(what: str, name: str, got: list[int], want: tuple) -> None:
    if len(got) != len(want):
        raise EngineError(f"{what}: tensor {name!r} has shape {got}, expected rank {len(want)} {list(want)}")
    for axis, (g, w) in enumerate(zip(got, want)):
        if isinstance(w, int) and g not in (-1, w):
            raise EngineError(f"{what}: tensor {name!r} axis {axis} is {g}, expected {w} (shape {list(want)}); "
                              f"was it exported from a model with other dimensions?")


def check_profile_fits(what: str, io: dict, shapes: dict) -> None:
    """A dimension the graph fixed must be the same at min and max of the profile."""
    for t in io["inputs"]:
        lo, _, hi = shapes[t["name"]]
        for axis, g in enumerate(t["shape"]):
            if g != -1 and not lo[axis] == hi[axis] == g:
                raise EngineError(f"{what}: input {t['name']!r} axis {axis} is fixed to {g} in the graph, but the "
                                  f"envelope asks for {lo[axis]}..{hi[axis]}; re-export with that axis dynamic")


def compute_capability(trt: ModuleType, value: str | int):
    """``"SM89"``, ``"sm_89"`` or ``89`` -> ``trt.ComputeCapability.SM89``."""
    key = f"SM{value}" if isinstance(value, int) else str(value).upper().replace("_", "")
    members = trt.ComputeCapability.__members__
    if key not in members or key in ("NONE", "CURRENT"):
        known = [m for m in members if m.startswith("SM")]
        raise ValueError(f"compute capability {value!r} is not one of {known}")
    return members[key]


def set_compute_capabilities(trt: ModuleType, config, targets: Iterable[str | int]) -> list[str]:
    if not hasattr(trt, "ComputeCapability"):
        raise EngineError(f"compute_capabilities needs TensorRT-RTX; TensorRT {trt.__version__} builds for the GPU "
                          f"it runs on")
    caps = [compute_capability(trt, v) for v in targets]
    config.num_compute_capabilities = len(caps)
    for i, cap in enumerate(caps):
        if not config.set_compute_capability(cap, i):
            raise EngineError(f"TensorRT-RTX refused compute capability {cap.name}")
    return [c.name for c in caps]


def attach_timing_cache(trt: ModuleType, config, path: Path):
    if is_rtx(trt):
        raise EngineError(f"timing_cache {path}: TensorRT-RTX {trt.__version__} has no timing cache "
                          f"(its timing-cache calls are no-ops); leave timing_cache out")
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineError(f"timing cache {path} was made on another GPU or TensorRT version; delete it")
    return cache


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far (not only the build's)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def build_engine(onnx_path: str | Path, spec: ComponentSpec, dims: ModelDims, envelope: ShapeEnvelope,
                 out_plan_path: str | Path, *, trt_module: ModuleType | None = None, optimization_level: int = 3,
                 workspace_bytes: int | None = None, timing_cache: str | Path | None = None,
                 compute_capabilities: Iterable[str | int] | None = None, progress: bool = True,
                 refittable: bool = False) -> dict:
    """Build ``spec``'s ONNX graph into a plan at ``out_plan_path``; return the build record.

    ``workspace_bytes=None`` leaves TensorRT's default (the GPU's memory); ``compute_capabilities=None``
    leaves TensorRT-RTX's default targets (SM80, 86, 89, 120 and later); ``refittable`` builds with
    ``BuilderFlag.REFIT``, so that the runtime's refitter can replace the weights (LoRA) without a rebuild.
    """
    onnx_path, out_plan_path = Path(onnx_path), Path(out_plan_path)
    what = f"{spec.name}: {onnx_path}"
    if not onnx_path.is_file():
        raise EngineError(f"{spec.name}: ONNX file {onnx_path} does not exist")
    if not out_plan_path.parent.is_dir():
        raise EngineError(f"{spec.name}: output folder {out_plan_path.parent} does not exist")
    trt = trt_module or import_trt()
    shapes = profile_shapes(spec, envelope, dims)
    start = time.perf_counter()

    logger = make_logger(trt, echo=progress)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineError(f"{what}: TensorRT's ONNX parser failed: " + "; ".join(parser_errors(parser) or logger.errors))
    precision = check_network(network_io(network), spec, onnx_path)
    check_profile_fits(what, network_io(network), shapes)

    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    targets = None if compute_capabilities is None else set_compute_capabilities(trt, config, compute_capabilities)
    cache = None if timing_cache is None else attach_timing_cache(trt, config, Path(timing_cache))
    monitor = make_progress_monitor(trt, spec.name) if progress and hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:
        config.progress_monitor = monitor
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(profile) < 0:
        raise EngineError(f"{what}: TensorRT rejected the optimization profile {shapes}: {'; '.join(logger.errors)}")

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        hint = (f" (a refittable plan: {trt.__name__} {trt.__version__} may need a GPU to build one; build without "
                f"--refittable, or on the GPU)" if refittable and is_rtx(trt) else "")
        raise EngineError(f"{what}: TensorRT could not build the engine{hint}: "
                          f"{'; '.join(logger.errors) or 'no message'}")
    atomic_write_bytes(out_plan_path, plan)
    if cache is not None:
        atomic_write_bytes(Path(timing_cache), config.get_timing_cache().serialize())
    seconds = time.perf_counter() - start
    if progress:
        log(f"{spec.name}: wrote {out_plan_path} ({plan.nbytes / 2**20:.1f} MiB) in {seconds:.1f}s")
    return {
        "component": spec.name,
        "onnx": str(onnx_path),
        "plan": str(out_plan_path),
        "plan_bytes": int(plan.nbytes),
        "precision": precision,
        **library_info(trt),
        "compute_capabilities": targets,
        "optimization_level": optimization_level,
        "refittable": refittable,
        "workspace_bytes": workspace_bytes,
        "envelope": envelope.to_json(),
        "io": network_io(network, profile),
        "build_seconds": seconds,
        "peak_rss_bytes": peak_rss_bytes(),
    }
