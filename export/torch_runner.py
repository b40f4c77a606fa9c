"""The torch reference backend: the checkpoint's own torch modules behind the runner interface, so
the same denoise loop runs over torch, ONNX Runtime and TensorRT alike.  It needs torch, so it
lives here and reaches a pipeline by injection:

    FluxPipeline.load("out/onnx", runners=torch_runners(ExportFolder.open("out/onnx")))
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from fluxrt.artifacts import ExportFolder
from fluxrt.components import STAGES, ComponentSpec
from fluxrt.dtypes import Array
from fluxrt.errors import CheckpointError
from fluxrt.export.checkpoint import Checkpoint
from fluxrt.export.onnx_export import load_graph_module
from fluxrt.lora import LoraFile, read_lora
from fluxrt.runner import Runner


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, spec: ComponentSpec, precision: str, checkpoint: Checkpoint, device: str = "cpu",
                 loras: Sequence[tuple[LoraFile, float]] = ()):
        """``loras``: the (file, scale) pairs the export merged into its transformer (``recorded_loras``)."""
        super().__init__(spec, precision)
        self.checkpoint = checkpoint
        self.loras = tuple(loras)
        self.torch_device = torch.device(device)
        self.device = "cuda" if self.torch_device.type == "cuda" else "cpu"
        self.module: torch.nn.Module | None = None

    @classmethod
    def from_export_folder(cls, folder: ExportFolder, name: str, device: str = "cpu") -> "TorchRunner":
        return torch_runners(folder, (name,), device)[name]

    def _activate(self) -> None:
        module = load_graph_module(self.name, self.checkpoint, self.precision, loras=self.loras)
        self.module = module.to(self.torch_device)

    def _deactivate(self) -> None:
        self.module = None

    def _infer(self, feed: Mapping[str, Array]) -> dict[str, Array]:
        args = [to_torch(feed[n], self.torch_device) for n in self.spec.input_names]
        with torch.no_grad():
            out = self.module(*args)
        outs = out if isinstance(out, tuple) else (out,)
        return {n: from_torch(t, self.device) for n, t in zip(self.spec.output_names, outs)}


def source_checkpoint(folder: ExportFolder) -> Checkpoint:
    """The checkpoint the export was made from, if it is still the same one (by its fingerprint)."""
    src = folder.manifest["source"]
    if src.get("foreign") or not src.get("path"):
        raise CheckpointError(f"export folder {folder.root} records no source checkpoint; the torch backend needs one")
    ckpt = Checkpoint.open(src["path"], transformer_file=src.get("transformer_file"), vae_file=src.get("vae_file"))
    got = ckpt.fingerprint()
    if got != src.get("fingerprint"):
        raise CheckpointError(f"checkpoint {ckpt.root} changed since {folder.root} was exported from it (fingerprint "
                              f"{got[:12]}, the manifest recorded {str(src.get('fingerprint'))[:12]}): the torch "
                              f"backend would not run the exported model; export again")
    return ckpt


def torch_runners(folder: ExportFolder, stages: tuple[str, ...] = STAGES, device: str = "cpu") -> dict[str, TorchRunner]:
    """Torch runners for ``stages`` of an export folder, from its (fingerprint-checked) source checkpoint."""
    ckpt = source_checkpoint(folder)
    loras = recorded_loras(folder) if "transformer" in stages else []
    return {s: TorchRunner(folder.spec(s), folder.graph_precision(s), ckpt, device,
                           loras if s == "transformer" else ()) for s in stages}


def recorded_loras(folder: ExportFolder) -> list[tuple[LoraFile, float]]:
    """The LoRA files the export merged into its transformer (``fluxrt export --lora``), read again and
    checked to be the files it merged."""
    out = []
    for record in folder.record("transformer").get("loras") or ():
        lora = read_lora(record["path"], folder.transformer_config())
        if lora.sha256 != record["sha256"]:
            raise CheckpointError(f"LoRA file {lora.path} changed since {folder.root} was exported with it merged "
                                  f"(sha256 {lora.sha256[:12]}, the manifest recorded {record['sha256'][:12]}): the "
                                  f"torch backend would not run the exported model; export again")
        out.append((lora, float(record["scale"])))
    return out


def to_torch(x: Array, device: torch.device) -> torch.Tensor:
    if str(x.dtype) == "bfloat16":
        return torch.from_numpy(np.asarray(x, dtype=np.float32)).to(device=device, dtype=torch.bfloat16)
    return torch.as_tensor(x, device=device)


def from_torch(t: torch.Tensor, device: str) -> Array:
    if device == "cuda":
        import cupy

        return cupy.from_dlpack(t.contiguous())
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()
