"""An engine folder: one plan per component, each with a provenance sidecar, built from an
export folder and kept up to date.

    ENGINE_DIR/engines.json             precision, envelope, dims, the export it came from
    ENGINE_DIR/NAME.plan + NAME.plan.json    plan and sidecar (ONNX hash, library, targets, build time...)
    ENGINE_DIR/transformer.fp8.onnx     the Q/DQ graph an FP8 plan was built from (kept beside it)
    ENGINE_DIR/tokenizer/ tokenizer_2/ scheduler/ vae/ export_manifest.json   what the runtime needs

A plan is rebuilt when its sidecar, its bytes, its ONNX graph or its build settings do not
match; a plan is never used (``verify_plan``) unless all of them, the library and the GPU match.
Every file is written under a temporary name and renamed; a per-component lock file (and one for
the side files and engines.json) keeps two builds into one folder from interleaving, and whoever
holds a lock deletes the temporaries a killed build left under it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

from fluxrt.components import ModelDims, component_spec
from fluxrt.engines.build import build_engine, log
from fluxrt.engines.profiles import ShapeEnvelope
from fluxrt.engines.trt import import_trt, library_info
from fluxrt.errors import EngineError
from fluxrt.files import atomic_write_text, sha256_file
from fluxrt.runtime.artifacts import ModelFolder

FORMAT = "fluxrt-engines/1"
ENGINE_PRECISIONS = ("fp16", "bf16", "fp8")
STAGES = ("clip", "t5", "transformer", "vae_decoder")  # the VAE encoder is built only if asked for
SIDE_FILES = ("tokenizer", "tokenizer_2", "scheduler", "vae")


def graph_sha256(onnx_path: Path) -> str:
    """Hash of the graph and, if present, its external data file."""
    h = hashlib.sha256(sha256_file(onnx_path).encode())
    data = onnx_path.with_name(onnx_path.name + ".data")
    if data.is_file():
        h.update(sha256_file(data).encode())
    return h.hexdigest()


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"{what} {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"{what} {path} is not readable JSON ({e})") from None


def remove_leftovers(out_dir: Path, *patterns: str) -> None:
    """Delete temporaries that a killed build left behind; call it holding the lock their writers hold."""
    for pattern in patterns:
        for path in out_dir.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextmanager
def locked(path: Path):
    """An exclusive advisory lock held while a component is built."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def current_gpu() -> dict | None:
    """Name and compute capability of CUDA device 0, or None without one."""
    try:
        import cupy

        dev = cupy.cuda.Device(0)
        cc = dev.compute_capability
        return {"name": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "compute_capability":
                f"SM{cc}"}
    except Exception:  # no cupy, no driver, no device: all mean "no usable GPU here"
        return None


@dataclass(frozen=True)
class BuildSettings:
    precision: str
    envelope: ShapeEnvelope
    optimization_level: int = 3
    workspace_bytes: int | None = None
    timing_cache: str | None = None
    compute_capabilities: tuple[str, ...] | None = None  # TensorRT-RTX targets; None: the library's default
    components: tuple[str, ...] = STAGES
    fp8: object = None  # fluxrt.engines.fp8.Fp8Settings for --precision fp8; None: its defaults

    def __post_init__(self) -> None:
        if self.precision not in ENGINE_PRECISIONS:
            raise ValueError(f"engine precision {self.precision!r} is not one of {ENGINE_PRECISIONS}")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization level {self.optimization_level} is not in 0..5")
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise ValueError(f"workspace limit must be positive, got {self.workspace_bytes} bytes")
        unknown = [c for c in self.components if c not in STAGES + ("vae_encoder",)]
        if unknown or not self.components:
            raise ValueError(f"components {list(self.components)}: each must be one of "
                             f"{list(STAGES) + ['vae_encoder']}")

    def fp8_settings(self):
        if self.precision != "fp8":
            return None
        from fluxrt.engines.fp8 import Fp8Settings

        return self.fp8 if self.fp8 is not None else Fp8Settings()

    def fp8_settings_dict(self) -> dict | None:
        settings = self.fp8_settings()
        return asdict(settings) if settings is not None else None

    def cache_key(self) -> dict:
        """What a plan depends on besides its graph and library (JSON-normalised, for comparison)."""
        return json.loads(json.dumps({"envelope": asdict(self.envelope), "optimization_level": self.optimization_level,
                "fp8_calibration": self.fp8_settings_dict(),
                "workspace_bytes": self.workspace_bytes,
                "compute_capabilities": list(self.compute_capabilities) if self.compute_capabilities else None}))


def plan_paths(out_dir: Path, name: str) -> tuple[Path, Path]:
    return out_dir / f"{name}.plan", out_dir / f"{name}.plan.json"


def up_to_date(out_dir: Path, name: str, onnx_sha: str, settings: BuildSettings, lib: dict) -> str | None:
    """None if the plan can be kept, else why it must be rebuilt."""
    plan, sidecar = plan_paths(out_dir, name)
    if not plan.is_file() or not sidecar.is_file():
        return "no plan yet"
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return "its sidecar is unreadable"
    if meta.get("onnx_sha256") != onnx_sha:
        return "its ONNX graph changed"
    if meta.get("settings") != settings.cache_key():
        return "the build settings changed"
    if (meta.get("library"), meta.get("version")) != (lib["library"], lib["version"]):
        return f"it was built with {meta.get('library')} {meta.get('version')}"
    if meta.get("plan_sha256") != sha256_file(plan):
        return "the plan file does not match its sidecar (corrupted or replaced)"
    return None


def source_graph(export_dir: Path, manifest: dict, name: str, settings: BuildSettings, out_dir: Path,
                 progress: bool) -> Path:
    """The ONNX graph a component's plan is built from; for FP8 the transformer's Q/DQ graph,
    calibrated now unless an up-to-date one exists."""
    onnx_path = export_dir / manifest["components"][name]["file"]
    if settings.precision != "fp8" or name != "transformer":
        return onnx_path
    from fluxrt.engines.fp8 import calibrate_fp8

    qdq = out_dir / "transformer.fp8.onnx"
    record = out_dir / "transformer.fp8.json"
    source = graph_sha256(onnx_path)
    wanted = {"source_sha256": source, "calibration": settings.fp8_settings_dict()}
    if qdq.is_file() and record.is_file():
        previous = json.loads(record.read_text())
        if {k: previous.get(k) for k in wanted} == wanted:
            return qdq
    if progress:
        log(f"transformer: calibrating FP8 (Q/DQ) from the export folder with {wanted['calibration']}")
    info = calibrate_fp8(export_dir, qdq, settings=settings.fp8_settings())
    # the record is written after the graph: a Q/DQ graph without it is recalibrated, never trusted
    atomic_write_json(record, dict(info, **wanted))
    return qdq


def check_export(export_dir: Path, manifest: dict, settings: BuildSettings) -> None:
    fused = [c for c, r in manifest.get("components", {}).items() if r.get("attention", "portable") != "portable"]
    if fused:
        raise EngineError(f"export folder {export_dir}: {fused} use ONNX Runtime's fused ops (MultiHeadAttention, "
                          f"RotaryEmbedding, SimplifiedLayerNormalization), which TensorRT cannot parse; export "
                          f"with --attention portable for engines")
    export_precision = manifest.get("precision")
    if settings.precision in ("fp16", "bf16") and export_precision != settings.precision:
        raise EngineError(
            f"export folder {export_dir} holds {export_precision} graphs; engines are strongly typed and take "
            f"their precision from the graph: export with --precision {settings.precision} for "
            f"{settings.precision} engines"
        )
    if settings.precision == "fp8" and export_precision not in ("fp16", "bf16"):
        raise EngineError(f"export folder {export_dir} holds {export_precision} graphs; FP8 engines are built "
                          f"from an fp16 or bf16 export (FP8 linears, the rest in that precision)")
    missing = [c for c in settings.components if c not in manifest.get("components", {})]
    if missing:
        raise EngineError(f"export folder {export_dir} has no {missing} graphs; it has "
                          f"{sorted(manifest.get('components', {}))}")


def copy_side_files(export_dir: Path, out_dir: Path) -> None:
    """Called holding the folder lock: two builds must not swap the same folders at once."""
    remove_leftovers(out_dir, *(f".{sub}.tmp-*" for sub in SIDE_FILES), ".export_manifest.json.tmp*")
    for sub in SIDE_FILES:
        staging = out_dir / f".{sub}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(export_dir / sub, staging)
        shutil.rmtree(out_dir / sub, ignore_errors=True)
        os.replace(staging, out_dir / sub)
    tmp = out_dir / f".export_manifest.json.tmp-{os.getpid()}"
    shutil.copyfile(export_dir / "manifest.json", tmp)
    os.replace(tmp, out_dir / "export_manifest.json")


def build_folder(export_dir: str | Path, out_dir: str | Path, settings: BuildSettings,
                 trt_module: ModuleType | None = None, progress: bool = True) -> dict:
    """Build every requested plan that is not up to date; return ``{component: "built"|"kept"}``."""
    from fluxrt.runtime.artifacts import ExportFolder

    if (Path(export_dir) / "manifest.json").exists():
        export = ExportFolder.open(export_dir)
    else:  # a folder of graphs fluxrt did not write, such as BFL's published ONNX files
        from fluxrt.components import ModelDims
        from fluxrt.engines.foreign import manifest_for

        manifest = manifest_for(export_dir)
        export = ExportFolder(Path(export_dir), manifest, ModelDims.from_json(manifest["dims"]))
    manifest = export.manifest
    check_export(export.root, manifest, settings)
    if settings.precision == "fp8" and manifest["source"].get("foreign"):
        raise EngineError(f"{export.root}: FP8 calibration runs the sampling loop, which needs a fluxrt export "
                          f"folder (tokenizers, scheduler); export the checkpoint with fluxrt export first")
    trt = trt_module or import_trt()
    lib = library_info(trt)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with locked(out_dir / ".folder.lock"):
        if not manifest["source"].get("foreign"):
            copy_side_files(export.root, out_dir)
    actions = {}
    for name in settings.components:
        plan, sidecar = plan_paths(out_dir, name)
        with locked(out_dir / f".{name}.lock"):
            remove_leftovers(out_dir, f".{name}.plan.*.tmp", f".{name}.plan.json.tmp-*")
            onnx_path = source_graph(export.root, manifest, name, settings, out_dir, progress)
            onnx_sha = graph_sha256(onnx_path)
            reason = up_to_date(out_dir, name, onnx_sha, settings, lib)
            if reason is None:
                actions[name] = "kept"
                if progress:
                    log(f"{name}: up to date, kept")
                continue
            if progress:
                log(f"{name}: building ({reason})")
            record = build_engine(onnx_path, component_spec(name, export.dims), export.dims, settings.envelope, plan,
                                  trt_module=trt, optimization_level=settings.optimization_level,
                                  workspace_bytes=settings.workspace_bytes, timing_cache=settings.timing_cache,
                                  compute_capabilities=settings.compute_capabilities, progress=progress)
            meta = dict(record, onnx_sha256=onnx_sha, plan_sha256=sha256_file(plan), settings=settings.cache_key(),
                        engine_precision=settings.precision, gpu=current_gpu(),
                        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            # the plan is already in place: a sidecar that is written last is what marks it as complete
            atomic_write_json(sidecar, meta)
            actions[name] = "built"
    with locked(out_dir / ".folder.lock"):
        remove_leftovers(out_dir, ".engines.json.tmp-*")
        atomic_write_json(out_dir / "engines.json", {
            "format": FORMAT, "precision": settings.precision, "variant": export.variant, "dims": export.dims.to_json(),
            "envelope": asdict(settings.envelope), "export": {"path": str(export.root.resolve()),
                                                              "source": manifest["source"]},
            "components": sorted(set(settings.components) | set(existing_components(out_dir))),
        })
    return actions


def existing_components(out_dir: Path) -> list[str]:
    return [p.name[: -len(".plan.json")] for p in out_dir.glob("*.plan.json")]


@dataclass(frozen=True)
class EngineFolder(ModelFolder):
    """The runtime's view of an engine folder (no TensorRT needed to open it)."""

    root: Path
    meta: dict
    dims: ModelDims

    @classmethod
    def open(cls, root: str | Path) -> "EngineFolder":
        root = Path(root)
        if not root.is_dir():
            raise EngineError(f"engine folder {root} does not exist")
        meta = read_json(root / "engines.json", "engine folder index")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise EngineError(f"{root / 'engines.json'}: format {got!r}, expected {FORMAT!r}")
        try:
            folder = cls(root, meta, ModelDims.from_json(meta["dims"]))
            _ = folder.envelope, folder.precision  # parsed here, not at first use
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{root / 'engines.json'} is incomplete or malformed ({type(e).__name__}: {e}); "
                              f"run fluxrt build again") from None
        return folder

    def read_side_json(self, relative: str, what: str) -> dict:
        return read_json(self.root / relative, what)

    @property
    def precision(self) -> str:
        return self.meta["precision"]

    @property
    def envelope(self) -> ShapeEnvelope:
        e = self.meta["envelope"]
        return ShapeEnvelope(**{k: tuple(v) for k, v in e.items()})

    def sidecar(self, name: str) -> dict:
        meta = read_json(plan_paths(self.root, name)[1], f"{name} plan sidecar")
        if not isinstance(meta, dict):
            raise EngineError(f"{name} plan sidecar {plan_paths(self.root, name)[1]} must hold a JSON object")
        return meta

    def graph_precision(self, name: str) -> str:
        return self.sidecar(name)["precision"]

    def export_graph_sha(self, name: str) -> str | None:
        """:func:`graph_sha256` of the export's graph, from export_manifest.json's file hash, where that
        determines it: not for a graph with an external data file, nor for the FP8 transformer (built
        from its Q/DQ graph)."""
        manifest = read_json(self.root / "export_manifest.json", "export manifest copy")
        record = ((manifest.get("components") if isinstance(manifest, dict) else None) or {}).get(name) or {}
        if not record.get("sha256") or record.get("data_file") or (self.precision == "fp8" and name == "transformer"):
            return None
        return hashlib.sha256(record["sha256"].encode()).hexdigest()

    def verify_plan(self, name: str, lib: dict, gpu: dict | None) -> Path:
        """The plan's path, if its sidecar matches its bytes, this library and this GPU."""
        plan, _ = plan_paths(self.root, name)
        meta = self.sidecar(name)
        if not plan.is_file():
            raise EngineError(f"{name} plan {plan} is missing (run fluxrt build again)")
        if meta.get("plan_sha256") != sha256_file(plan):
            raise EngineError(f"{name} plan {plan} does not match its sidecar: corrupted or replaced; rebuild it "
                              f"with fluxrt build")
        built_for = ((meta.get("settings") or {}).get("envelope"), meta.get("engine_precision"))
        if built_for != (self.meta["envelope"], self.precision):
            raise EngineError(f"{name} plan {plan} was built as {built_for[1]} for envelope {built_for[0]}, but "
                              f"engines.json says {self.precision} for {self.meta['envelope']}: the folder mixes two "
                              f"builds (an interrupted fluxrt build?); run fluxrt build again")
        want_onnx = self.export_graph_sha(name)
        if want_onnx is not None and meta.get("onnx_sha256") != want_onnx:
            raise EngineError(f"{name} plan {plan} was built from another {name} graph than the export this folder "
                              f"records (export_manifest.json): the folder mixes two exports (an interrupted "
                              f"fluxrt build?); run fluxrt build again")
        if (meta.get("library"), meta.get("version")) != (lib["library"], lib["version"]):
            raise EngineError(f"{name} plan {plan} was built with {meta.get('library')} {meta.get('version')}; "
                              f"this machine has {lib['library']} {lib['version']}: rebuild it")
        if gpu is not None:
            targets = meta.get("compute_capabilities")
            built_on = (meta.get("gpu") or {}).get("compute_capability")
            allowed = targets or ([built_on] if built_on else None)
            if allowed and gpu["compute_capability"] not in allowed:
                raise EngineError(f"{name} plan {plan} was built for {allowed}; this GPU ({gpu['name']}) is "
                                  f"{gpu['compute_capability']}: rebuild it here")
        return plan
