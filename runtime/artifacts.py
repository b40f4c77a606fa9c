"""Read an export folder (written by ``fluxrt export``) without torch: manifest, graphs,
tokenizer files, scheduler and VAE settings, each checked and named in errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fluxrt.components import ComponentSpec, ModelDims, component_spec
from fluxrt.errors import ExportError

EXPORT_FORMAT = "fluxrt-export/1"


def read_json_file(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ExportError(f"{what}: {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{what}: {path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{what}: {path} must hold a JSON object")
    return data


class ModelFolder:
    """What export and engine folders share: the model's tensor descriptions and side files.
    Subclasses have ``root`` and ``dims`` and say how a side file is read (which error it raises)."""

    def read_side_json(self, relative: str, what: str) -> dict:
        raise NotImplementedError

    @property
    def variant(self) -> str:
        return self.dims.variant

    def spec(self, name: str) -> ComponentSpec:
        return component_spec(name, self.dims)

    def tokenizer_path(self, kind: str) -> Path:
        return self.root / ("tokenizer" if kind == "clip" else "tokenizer_2") / "tokenizer.json"

    def scheduler_config(self) -> dict:
        return self.read_side_json("scheduler/scheduler_config.json", "scheduler config")

    def vae_config(self) -> dict:
        return self.read_side_json("vae/config.json", "VAE config")


@dataclass(frozen=True)
class ExportFolder(ModelFolder):
    root: Path
    manifest: dict
    dims: ModelDims

    @classmethod
    def open(cls, root: str | Path) -> "ExportFolder":
        root = Path(root)
        if not root.is_dir():
            raise ExportError(f"export folder {root} does not exist")
        manifest = read_json_file(root / "manifest.json", "export manifest")
        if manifest.get("format") != EXPORT_FORMAT:
            raise ExportError(f"{root / 'manifest.json'}: format {manifest.get('format')!r}, "
                              f"expected {EXPORT_FORMAT!r} (is this a fluxrt export folder?)")
        try:
            dims = ModelDims.from_json(manifest["dims"])
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"{root / 'manifest.json'}: invalid 'dims': {e}") from None
        return cls(root, manifest, dims)

    def read_side_json(self, relative: str, what: str) -> dict:
        return read_json_file(self.root / relative, what)

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    def components(self) -> list[str]:
        return list(self.manifest.get("components", {}))

    def graph_precision(self, name: str) -> str:
        return self.record(name)["precision"]

    def record(self, name: str) -> dict:
        records = self.manifest.get("components", {})
        if name not in records:
            raise ExportError(f"export folder {self.root} has no {name} graph; it has {sorted(records)} "
                              f"(run fluxrt export --components ...)")
        return records[name]

    def graph_path(self, name: str) -> Path:
        path = self.root / self.record(name)["file"]
        if not path.is_file():
            raise ExportError(f"{name} graph {path} listed in the manifest is missing")
        return path
