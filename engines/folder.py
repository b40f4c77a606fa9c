"""Build an engine folder from an export folder and keep it up to date (the folder's format, its
readers and its checks are ``fluxrt.artifacts``).

A plan is rebuilt when its sidecar, its bytes, its source graph's fingerprint or its build settings
do not match; the export's graphs are verified against their manifest before anything is built.
Every file is written under a temporary name and renamed; a per-component lock file (and one for
the side files and engines.json) keeps two builds into one folder from interleaving, and whoever
holds a lock deletes the temporaries a killed build left under it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

from fluxrt.artifacts import (
    ENGINE_PRECISIONS, EXPORT_MANIFEST, EXPORT_MANIFEST_COPY, FP8_GRAPH, SIDE_FILES, ExportFolder, current_gpu,
    graph_fingerprint, plan_paths, write_engines_index, write_sidecar,
)
from fluxrt.components import STAGES, ShapeEnvelope, component_spec
from fluxrt.engines.build import build_engine, log
from fluxrt.errors import EngineError
from fluxrt.files import atomic_path, locked, remove_leftovers, replace_tree, separate_folders, sha256_file
from fluxrt.trt import import_trt, library_info

BUILDABLE = STAGES + ("vae_encoder",)  # the VAE encoder is built only if asked for


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
    refittable: bool = False  # the transformer's plan built with BuilderFlag.REFIT (LoRA by the refitter)

    def __post_init__(self) -> None:
        if self.precision not in ENGINE_PRECISIONS:
            raise ValueError(f"BuildSettings.precision {self.precision!r} is not one of {ENGINE_PRECISIONS}")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"BuildSettings.optimization_level {self.optimization_level} is not in 0..5")
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise ValueError(f"BuildSettings.workspace_bytes must be positive, got {self.workspace_bytes} bytes")
        unknown = [c for c in self.components if c not in BUILDABLE]
        if unknown or not self.components:
            raise ValueError(f"BuildSettings.components {list(self.components)}: each must be one of {list(BUILDABLE)}")

    def fp8_settings(self):
        if self.precision != "fp8":
            return None
        from fluxrt.engines.fp8 import QUICK_CALIBRATION

        return self.fp8 if self.fp8 is not None else QUICK_CALIBRATION

    def fp8_settings_dict(self) -> dict | None:
        settings = self.fp8_settings()
        return asdict(settings) if settings is not None else None

    def cache_key(self) -> dict:
        """What a plan depends on besides its graph and library (JSON-normalised, for comparison)."""
        return json.loads(json.dumps({
            "envelope": self.envelope.to_json(), "optimization_level": self.optimization_level,
            "fp8_calibration": self.fp8_settings_dict(), "workspace_bytes": self.workspace_bytes,
            "compute_capabilities": list(self.compute_capabilities) if self.compute_capabilities else None,
            **({"refittable": True} if self.refittable else {})}))


def up_to_date(out_dir: Path, name: str, onnx_fingerprint: str, settings: BuildSettings, lib: dict) -> str | None:
    """None if the plan can be kept, else why it must be rebuilt."""
    plan, sidecar = plan_paths(out_dir, name)
    if not plan.is_file() or not sidecar.is_file():
        return "no plan yet"
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return "its sidecar is unreadable"
    if not isinstance(meta, dict) or meta.get("onnx_fingerprint") != onnx_fingerprint:
        return "its ONNX graph changed"
    if meta.get("settings") != settings.cache_key():
        return "the build settings changed"
    if (meta.get("library"), meta.get("version")) != (lib["library"], lib["version"]):
        return f"it was built with {meta.get('library')} {meta.get('version')}"
    if meta.get("plan_sha256") != sha256_file(plan):
        return "the plan file does not match its sidecar (corrupted or replaced)"
    return None


def source_graph(export: ExportFolder, name: str, settings: BuildSettings, out_dir: Path,
                 progress: bool) -> tuple[Path, str]:
    """The graph a component's plan is built from and its fingerprint digest: the export's (verified
    against its manifest), or for FP8 the transformer's Q/DQ graph, calibrated now unless a matching
    one exists."""
    if export.foreign:
        path = export.graph_path(name)
        source = graph_fingerprint(path)["sha256"]
    else:
        path = export.verified_graph(name)
        source = export.record(name)["fingerprint"]["sha256"]
    if settings.precision != "fp8" or name != "transformer" or export.precision == "fp8":
        return path, source  # an FP8 export (fluxrt quantize) holds the calibrated graph already
    from fluxrt.engines.fp8 import calibrate_fp8, reusable_calibration

    calibration = settings.fp8_settings_dict()
    kept = reusable_calibration(out_dir / FP8_GRAPH, source, calibration)
    if kept is not None:
        return out_dir / FP8_GRAPH, kept["fingerprint"]["sha256"]
    if progress:
        log(f"transformer: calibrating FP8 (Q/DQ) from the export folder with {calibration}")
    record = calibrate_fp8(export.root, out_dir / FP8_GRAPH, settings=settings.fp8_settings())
    return out_dir / FP8_GRAPH, record["fingerprint"]["sha256"]


def check_settings(export: ExportFolder, settings: BuildSettings, trt: ModuleType) -> None:
    """What the export and the library allow: the text length the model takes, targets the library knows, and
    for FP8 the calibration's prompts (the bundled ones hold a fixed number)."""
    from fluxrt.engines.build import compute_capability

    top = export.dims.t5_max_length
    if settings.envelope.text_length[2] > top:
        raise EngineError(f"text length {settings.envelope.text_length[2]} exceeds the {top} T5 tokens the model takes "
                          f"(--text-length MIN,OPT,MAX with MAX <= {top})")
    if settings.compute_capabilities:
        if not hasattr(trt, "ComputeCapability"):
            raise EngineError(f"compute capabilities need TensorRT-RTX; TensorRT {trt.__version__} builds for the GPU "
                              f"it runs on (leave --compute-capability out)")
        for value in settings.compute_capabilities:
            try:
                compute_capability(trt, value)
            except ValueError as e:
                raise EngineError(f"--compute-capability: {e}") from None
    if settings.refittable and settings.precision == "fp8":
        raise EngineError("--refittable with --precision fp8: TensorRT refits weights, not the FP8 quantization "
                          "around them, so a LoRA merged into FP8 weights needs them quantized again; fluxrt does "
                          "that on ONNX Runtime: run the FP8 export folder (fluxrt quantize) with --backend ort-cuda "
                          "and --lora, or build fp16/bf16 plans with --refittable")
    if settings.refittable and "transformer" not in settings.components:
        raise EngineError(f"--refittable makes the transformer's plan refittable (the one a LoRA changes), but "
                          f"--components {','.join(settings.components)} builds no transformer")
    fp8 = settings.fp8_settings()
    if fp8 is not None and not (export.precision == "fp8"):
        from fluxrt.engines.fp8 import check_calibration

        check_calibration(fp8, export)


def check_export(export: ExportFolder, settings: BuildSettings) -> None:
    manifest, export_dir = export.manifest, export.root
    fused = [c for c, r in manifest.get("components", {}).items() if r.get("attention", "portable") != "portable"]
    if fused:
        raise EngineError(f"export folder {export_dir}: {fused} use ONNX Runtime's fused ops (MultiHeadAttention, "
                          f"RotaryEmbedding, SimplifiedLayerNormalization), which TensorRT cannot parse; export "
                          f"with --attention portable for engines")
    export_precision = manifest.get("precision")
    if export_precision == "fp8" and settings.precision != "fp8":
        raise EngineError(f"export folder {export_dir} is an FP8 export (fluxrt quantize of a "
                          f"{manifest.get('base_precision')} export): build it with --precision fp8")
    if settings.precision in ("fp16", "bf16") and export_precision != settings.precision:
        raise EngineError(
            f"export folder {export_dir} holds {export_precision} graphs; engines are strongly typed and take "
            f"their precision from the graph: export with --precision {settings.precision} for "
            f"{settings.precision} engines"
        )
    if settings.precision == "fp8" and export_precision not in ("fp16", "bf16", "fp8"):
        raise EngineError(f"export folder {export_dir} holds {export_precision} graphs; FP8 engines are built "
                          f"from an FP8 export (fluxrt quantize) or an fp16 or bf16 one (calibrated first)")
    missing = [c for c in settings.components if c not in manifest.get("components", {})]
    if missing:
        raise EngineError(f"export folder {export_dir} has no {missing} graphs; it has "
                          f"{sorted(manifest.get('components', {}))}")
    if settings.precision == "fp8" and export.foreign and export_precision != "fp8":
        raise EngineError(f"{export_dir}: FP8 calibration runs the sampling loop, which needs a fluxrt export "
                          f"folder (tokenizers, scheduler); export the checkpoint with fluxrt export first")


def copy_side_files(export_dir: Path, out_dir: Path) -> None:
    """Called holding the folder lock: two builds must not swap the same folders at once."""
    remove_leftovers(out_dir, *(f".{sub}.tmp-*" for sub in SIDE_FILES), f".{EXPORT_MANIFEST_COPY}.*.tmp")
    for sub in SIDE_FILES:
        replace_tree(export_dir / sub, out_dir / sub)
    with atomic_path(out_dir / EXPORT_MANIFEST_COPY) as tmp:
        shutil.copyfile(export_dir / EXPORT_MANIFEST, tmp)


def open_export(export_dir: Path) -> ExportFolder:
    """A fluxrt export folder, or a folder of graphs fluxrt did not write (BFL's published ONNX files)."""
    if (Path(export_dir) / EXPORT_MANIFEST).exists():
        return ExportFolder.open(export_dir)
    from fluxrt.engines.foreign import manifest_for

    return ExportFolder.from_manifest(Path(export_dir), manifest_for(export_dir))


def build_folder(export_dir: str | Path, out_dir: str | Path, settings: BuildSettings,
                 trt_module: ModuleType | None = None, progress: bool = True) -> dict:
    """Build every requested plan that is not up to date; return ``{component: "built"|"kept"}``."""
    export = open_export(Path(export_dir))
    separate_folders(export.root, Path(out_dir), "the export folder", "--out", EngineError)
    check_export(export, settings)
    trt = trt_module or import_trt()
    check_settings(export, settings, trt)  # every option, before anything is written
    lib = library_info(trt)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with locked(out_dir / ".folder.lock"):
        if not export.foreign:
            copy_side_files(export.root, out_dir)
    actions = {}
    for name in settings.components:
        plan, _ = plan_paths(out_dir, name)
        with locked(out_dir / f".{name}.lock"):
            remove_leftovers(out_dir, f".{name}.plan.*.tmp", f".{name}.plan.json.*.tmp")
            onnx_path, fingerprint = source_graph(export, name, settings, out_dir, progress)
            reason = up_to_date(out_dir, name, fingerprint, settings, lib)
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
                                  compute_capabilities=settings.compute_capabilities, progress=progress,
                                  refittable=settings.refittable and name == "transformer")
            # the plan is already in place: a sidecar that is written last is what marks it as complete
            write_sidecar(out_dir, name, dict(
                record, onnx_fingerprint=fingerprint, plan_sha256=sha256_file(plan), settings=settings.cache_key(),
                engine_precision=settings.precision, gpu=current_gpu(),
                built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
            actions[name] = "built"
    with locked(out_dir / ".folder.lock"):
        remove_leftovers(out_dir, ".engines.json.*.tmp")
        write_engines_index(out_dir, {
            "precision": settings.precision, "variant": export.variant, "dims": export.dims.to_json(),
            "envelope": settings.envelope.to_json(), "export": {"path": str(export.root.resolve()),
                                                                "source": export.manifest["source"]},
            "components": sorted(set(settings.components) | set(existing_components(out_dir))),
        })
    return actions


def existing_components(out_dir: Path) -> list[str]:
    return [p.name[: -len(".plan.json")] for p in out_dir.glob("*.plan.json")]
