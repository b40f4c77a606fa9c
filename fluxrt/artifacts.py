"""The artifact formats every stage shares: the export folder (``fluxrt export``) and the engine
folder (``fluxrt build``), their readers and writers, the fingerprints of the files they consist
of, and the checks that refuse a stale, foreign or replaced file before anything uses it.

    EXPORT/manifest.json         variant, precision, dims, one record per graph, source fingerprint
    EXPORT/NAME.onnx [+ NAME.onnx.data]   each graph, fingerprinted with every file it references
    ENGINES/engines.json         precision, envelope, dims, the export it came from
    ENGINES/NAME.plan + NAME.plan.json    plan and sidecar (its own hash, its graph's fingerprint, ...)
    ENGINES/transformer.fp8.onnx + .json  an FP8 plan's Q/DQ graph and its record (own and source fingerprint)
    both: tokenizer/ tokenizer_2/ scheduler/ vae/   what the runtime needs besides the networks

A graph's fingerprint covers the ``.onnx`` file and every external data file it references:
``{"files": {name: sha256}, "sha256": digest of those}``; export records and plan sidecars use the
same definition, so a plan can be traced to the export graph it was built from.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from fluxrt.components import COMPONENTS, ComponentSpec, ModelDims, ShapeEnvelope, component_spec
from fluxrt.dtypes import PRECISION_DTYPE
from fluxrt.errors import EngineError, ExportError, InvalidInputError
from fluxrt.files import atomic_write_json, read_json, sha256_file

EXPORT_FORMAT = "fluxrt-export/2"
ENGINES_FORMAT = "fluxrt-engines/2"
EXPORT_MANIFEST = "manifest.json"
ENGINES_INDEX = "engines.json"
EXPORT_MANIFEST_COPY = "export_manifest.json"  # the export's manifest, copied into the engine folder
ENGINE_PRECISIONS = ("fp16", "bf16", "fp8")
SIDE_FILES = ("tokenizer", "tokenizer_2", "scheduler", "vae")
FP8_GRAPH = "transformer.fp8.onnx"  # in the engine folder, beside the FP8 plan; its record: transformer.fp8.json
EXTERNAL_DATA_BYTES = 2**31 - 2**26  # weights beyond this go to NAME.onnx.data: protobuf's 2 GB, less room for the graph


# ---- fingerprints -------------------------------------------------------------------------------

def external_data_files(onnx_path: Path) -> list[str]:
    """Names (relative to the graph's folder) of the external data files a graph references."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    found: set[str] = set()

    def tensors(graph):
        yield from graph.initializer
        yield from (s.values for s in graph.sparse_initializer)
        for node in graph.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from tensors(g)

    for t in tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            found.update(e.value for e in t.external_data if e.key == "location")
    return sorted(found)


def files_digest(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in sorted(files.items())).encode()).hexdigest()


def graph_fingerprint(onnx_path: Path) -> dict:
    """``{"files": {name: sha256}, "sha256": digest}`` of a graph and the data files it references."""
    onnx_path = Path(onnx_path)
    files = {onnx_path.name: sha256_file(onnx_path)}
    for name in external_data_files(onnx_path):
        data = onnx_path.parent / name
        if not data.is_file():
            raise ExportError(f"{onnx_path} references external data {data}, which is missing")
        files[name] = sha256_file(data)
    return {"files": files, "sha256": files_digest(files)}


def verify_fingerprint(folder: Path, fingerprint: dict, what: str, error: type, remedy: str) -> None:
    """Raise ``error`` naming the first file of ``fingerprint`` that is missing or differs."""
    files = fingerprint.get("files") if isinstance(fingerprint, dict) else None
    if not isinstance(files, dict) or not files:
        raise error(f"{what}: its record has no file fingerprints (written by an older fluxrt?); {remedy}")
    for name, want in files.items():
        path = Path(folder) / name
        if not path.is_file():
            raise error(f"{what}: {path} is missing; {remedy}")
        got = sha256_file(path)
        if got != want:
            raise error(f"{what}: {path} is not the file that was recorded (sha256 {got[:12]}..., expected "
                        f"{want[:12]}...): swapped, replaced or corrupted; {remedy}")


# ---- both folders -------------------------------------------------------------------------------

class ModelFolder:
    """What export and engine folders share: the model's tensor descriptions and side files."""

    kind = "abstract"  # "export" or "engines"
    root: Path
    dims: ModelDims
    error: type = ExportError

    @property
    def variant(self) -> str:
        return self.dims.variant

    def spec(self, name: str) -> ComponentSpec:
        return component_spec(name, self.dims)

    def read_side_json(self, relative: str, what: str) -> dict:
        return read_json(self.root / relative, what, self.error)

    def tokenizer_path(self, kind: str) -> Path:
        return self.root / ("tokenizer" if kind == "clip" else "tokenizer_2") / "tokenizer.json"

    def scheduler_config(self) -> dict:
        return self.read_side_json("scheduler/scheduler_config.json", "scheduler config")

    def vae_config(self) -> dict:
        return self.read_side_json("vae/config.json", "VAE config")

    def source_manifest(self) -> dict:
        """The manifest of the export the folder is (or was built from); {} when there is none."""
        raise NotImplementedError

    def components(self) -> list[str]:
        """The components the folder has a graph or plan of."""
        raise NotImplementedError

    def transformer_config(self) -> dict:
        """diffusers' config of the transformer, as the export recorded it (LoRA files are checked against it)."""
        config = self.source_manifest().get("transformer_config")
        if not isinstance(config, dict):
            raise self.error(f"{self.root} records no transformer config (graphs fluxrt did not export?), so a LoRA "
                             f"file cannot be checked against its model")
        return config


def open_folder(path: str | Path) -> "ExportFolder | EngineFolder":
    """An export folder (has manifest.json) or an engine folder (has engines.json)."""
    path = Path(path)
    if (path / ENGINES_INDEX).is_file():
        return EngineFolder.open(path)
    if path.is_dir() and not (path / EXPORT_MANIFEST).is_file():
        raise ExportError(f"{path} is neither an export folder (no {EXPORT_MANIFEST}, see fluxrt export) nor an "
                          f"engine folder (no {ENGINES_INDEX}, see fluxrt build)")
    return ExportFolder.open(path)


# ---- export folders -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportFolder(ModelFolder):
    root: Path
    manifest: dict
    dims: ModelDims
    kind = "export"

    @classmethod
    def open(cls, root: str | Path) -> "ExportFolder":
        root = Path(root)
        if not root.is_dir():
            raise ExportError(f"export folder {root} does not exist")
        path = root / EXPORT_MANIFEST
        manifest = read_json(path, "export manifest", ExportError)
        if manifest.get("format") != EXPORT_FORMAT:
            raise ExportError(f"{path}: format {manifest.get('format')!r}, expected {EXPORT_FORMAT!r} (not a fluxrt "
                              f"export folder, or one written by another fluxrt version: export again)")
        return cls.from_manifest(root, manifest)

    @classmethod
    def from_manifest(cls, root: Path, manifest: dict) -> "ExportFolder":
        try:
            dims = ModelDims.from_json(manifest["dims"])
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"{root / EXPORT_MANIFEST}: invalid 'dims': {e}") from None
        folder = cls(Path(root), manifest, dims)
        folder.check_manifest()
        return folder

    def check_manifest(self) -> None:
        """The manifest against its schema and the folder: precisions, one record per known graph, each naming a
        file inside the folder and (for fluxrt's own exports) a complete fingerprint; the VAE scale the dims
        give against the VAE config beside it."""
        where = self.root / EXPORT_MANIFEST
        m = self.manifest
        if m.get("precision") not in MANIFEST_PRECISIONS:
            raise ExportError(f"{where}: precision {m.get('precision')!r} is not one of {list(MANIFEST_PRECISIONS)}")
        records = m.get("components")
        if not isinstance(records, dict):
            raise ExportError(f"{where}: 'components' must be an object of graph records, got {records!r}")
        for name, record in records.items():
            what = f"{where}: components.{name}"
            if name not in COMPONENTS:
                raise ExportError(f"{what}: not one of the graphs {list(COMPONENTS)}")
            if not isinstance(record, dict):
                raise ExportError(f"{what} must be an object, got {record!r}")
            inside(self.root, record.get("file"), f"{what}.file")
            if record.get("precision") not in PRECISION_DTYPE:
                raise ExportError(f"{what}.precision {record.get('precision')!r} is not one of {list(PRECISION_DTYPE)}")
            if self.foreign:
                continue
            fp = record.get("fingerprint")
            files = fp.get("files") if isinstance(fp, dict) else None
            if not isinstance(files, dict) or not files or not is_sha256(fp.get("sha256")) or \
                    not all(is_sha256(v) for v in files.values()):
                raise ExportError(f"{what}.fingerprint must hold 'files' {{name: sha256}} and 'sha256', got {fp!r}: "
                                  f"export again")
            for file in files:
                inside(self.root, file, f"{what}.fingerprint.files")
            loras = record.get("loras", [])
            if not isinstance(loras, list) or not all(is_lora_record(r) for r in loras):
                raise ExportError(f"{what}.loras must be a list of {{path, sha256, layout, scale}} records of the LoRA "
                                  f"files merged into it, got {loras!r}: export again")
        vae = self.root / "vae" / "config.json"
        if vae.is_file():
            channels = read_json(vae, "VAE config", ExportError).get("block_out_channels")
            if isinstance(channels, list) and channels and self.dims.vae_scale_factor != 2 ** (len(channels) - 1):
                raise ExportError(f"{where}: dims.vae_scale_factor {self.dims.vae_scale_factor} disagrees with {vae} "
                                  f"({len(channels)} VAE levels: {2 ** (len(channels) - 1)})")

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    def source_manifest(self) -> dict:
        return self.manifest

    @property
    def foreign(self) -> bool:
        """A folder of graphs fluxrt did not write (no tokenizers or scheduler)."""
        return bool(self.manifest.get("source", {}).get("foreign"))

    def components(self) -> list[str]:
        """The graphs the folder holds, by component name."""
        return sorted(self.manifest.get("components", {}))

    def record(self, name: str) -> dict:
        records = self.manifest.get("components", {})
        if name not in records:
            raise ExportError(f"export folder {self.root} has no {name} graph; it has {sorted(records)} "
                              f"(run fluxrt export --components ...)")
        return records[name]

    def graph_precision(self, name: str) -> str:
        return self.record(name)["precision"]

    def graph_path(self, name: str) -> Path:
        path = self.root / self.record(name)["file"]
        if not path.is_file():
            raise ExportError(f"{name} graph {path} listed in the manifest is missing")
        return path

    def verified_graph(self, name: str) -> Path:
        """The graph's path, once every file it consists of (the graph and its external data) has the
        bytes the manifest recorded: a swapped, replaced, truncated or edited file is refused by name.
        A quantized graph's calibration record must name the same fingerprint."""
        path = self.graph_path(name)
        record = self.record(name)
        verify_fingerprint(self.root, record.get("fingerprint"), f"{name} graph", ExportError, "export again")
        quantization = record.get("quantization")
        if quantization:
            calibration = read_json(self.root / quantization["record"], f"{name} calibration record", ExportError)
            if (calibration.get("fingerprint") or {}).get("sha256") != record["fingerprint"]["sha256"]:
                raise ExportError(f"{name} calibration record {self.root / quantization['record']} does not describe "
                                  f"{path} (another calibration's record?): run fluxrt quantize again")
        return path


def write_export_manifest(root: Path, manifest: dict) -> None:
    atomic_write_json(Path(root) / EXPORT_MANIFEST, dict(manifest, format=EXPORT_FORMAT))


MANIFEST_PRECISIONS = ("fp32", "fp16", "bf16", "fp8")


def is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def is_lora_record(value) -> bool:
    """One merged LoRA file as an export record lists it (export/lora.py writes them)."""
    scale = value.get("scale") if isinstance(value, dict) else None
    return (isinstance(value, dict) and isinstance(value.get("path"), str) and is_sha256(value.get("sha256"))
            and not isinstance(scale, bool) and isinstance(scale, (int, float)) and math.isfinite(scale))


def inside(root: Path, name, what: str) -> Path:
    """``root / name`` for a relative ``name`` that stays inside ``root``; ExportError otherwise."""
    if not isinstance(name, str) or not name:
        raise ExportError(f"{what} must be a file name, got {name!r}")
    path = (Path(root) / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(Path(root).resolve()):
        raise ExportError(f"{what} {name!r} points outside the folder {root}")
    return path


# ---- engine folders -----------------------------------------------------------------------------

def plan_paths(root: Path, name: str) -> tuple[Path, Path]:
    return Path(root) / f"{name}.plan", Path(root) / f"{name}.plan.json"


def fp8_record_path(root: Path) -> Path:
    return Path(root) / FP8_GRAPH.replace(".onnx", ".json")


def write_sidecar(root: Path, name: str, meta: dict) -> None:
    atomic_write_json(plan_paths(root, name)[1], meta)


def write_engines_index(root: Path, index: dict) -> None:
    atomic_write_json(Path(root) / ENGINES_INDEX, dict(index, format=ENGINES_FORMAT))


def current_gpu() -> dict | None:
    """Name and compute capability of CUDA device 0, or None without one."""
    try:
        import cupy

        dev = cupy.cuda.Device(0)
        return {"name": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                "compute_capability": f"SM{dev.compute_capability}"}
    except Exception:  # no cupy, no driver, no device: all mean "no usable GPU here"
        return None


@dataclass(frozen=True)
class EngineFolder(ModelFolder):
    """The runtime's view of an engine folder (no TensorRT needed to open it)."""

    root: Path
    meta: dict
    dims: ModelDims
    kind = "engines"
    error = EngineError

    @classmethod
    def open(cls, root: str | Path) -> "EngineFolder":
        root = Path(root)
        if not root.is_dir():
            raise EngineError(f"engine folder {root} does not exist")
        meta = read_json(root / ENGINES_INDEX, "engine folder index", EngineError)
        if meta.get("format") != ENGINES_FORMAT:
            raise EngineError(f"{root / ENGINES_INDEX}: format {meta.get('format')!r}, expected {ENGINES_FORMAT!r} "
                              f"(written by another fluxrt version? run fluxrt build again)")
        try:
            folder = cls(root, meta, ModelDims.from_json(meta["dims"]))
            _ = folder.envelope, folder.precision  # parsed here, not at first use
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{root / ENGINES_INDEX} is incomplete or malformed ({type(e).__name__}: {e}); "
                              f"run fluxrt build again") from None
        return folder

    @property
    def precision(self) -> str:
        return self.meta["precision"]

    @property
    def envelope(self) -> ShapeEnvelope:
        return ShapeEnvelope.from_json(self.meta["envelope"])

    def components(self) -> list[str]:
        """The plans the folder holds, by component name: those its index lists (those with a sidecar where the
        index lists none)."""
        listed = self.meta.get("components")
        if isinstance(listed, list):
            return sorted(str(n) for n in listed)
        return [n for n in COMPONENTS if plan_paths(self.root, n)[1].is_file()]

    def sidecar(self, name: str) -> dict:
        return read_json(plan_paths(self.root, name)[1], f"{name} plan sidecar", EngineError)

    def source_manifest(self) -> dict:
        copy = self.root / EXPORT_MANIFEST_COPY
        return read_json(copy, "export manifest copy", EngineError) if copy.is_file() else {}

    def graph_precision(self, name: str) -> str:
        return self.sidecar(name)["precision"]

    def expected_graph(self, name: str) -> str | None:
        """The fingerprint digest of the graph ``name``'s plan must have been built from: the FP8 record's
        for a transformer calibrated into this folder, else the export manifest copy's (an FP8 export's
        transformer included; None for foreign exports, which have no copy)."""
        if self.precision == "fp8" and name == "transformer" and fp8_record_path(self.root).is_file():
            record = read_json(fp8_record_path(self.root), "FP8 graph record", EngineError)
            return (record.get("fingerprint") or {}).get("sha256")
        copy = self.root / EXPORT_MANIFEST_COPY
        if not copy.is_file():
            return None
        manifest = read_json(copy, "export manifest copy", EngineError)
        return ((manifest.get("components") or {}).get(name) or {}).get("fingerprint", {}).get("sha256")

    def verify_plan(self, name: str, lib: dict, gpu: dict | None) -> Path:
        """The plan's path, if its sidecar matches its bytes, the export, this library and this GPU."""
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
                              f"{ENGINES_INDEX} says {self.precision} for {self.meta['envelope']}: the folder mixes "
                              f"two builds (an interrupted fluxrt build?); run fluxrt build again")
        want = self.expected_graph(name)
        if want is not None and meta.get("onnx_fingerprint") != want:
            raise EngineError(f"{name} plan {plan} was built from another {name} graph than the one this folder "
                              f"records: the folder mixes two exports or calibrations (an interrupted fluxrt "
                              f"build?); run fluxrt build again")
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


def check_envelope(envelope: ShapeEnvelope, batch: int, height: int, width: int, text_length: int) -> None:
    """Raise unless a call fits the shape envelope an engine folder was built for (before any stage runs)."""
    for name, value, (lo, _, hi), unit in (
            ("height", height, envelope.image_side, " pixels"), ("width", width, envelope.image_side, " pixels"),
            ("batch (prompts x num_images_per_prompt)", batch, envelope.batch, ""),
            ("max_sequence_length", text_length, envelope.text_length, " tokens")):
        if not lo <= value <= hi:
            raise InvalidInputError(f"{name} {value} is outside the engines' range {lo}..{hi}{unit} (the envelope "
                                    f"they were built for; rebuild with fluxrt build for other sizes)")
