"""The torch reference backend: the checkpoint's own torch modules behind the runtime's runner
interface, so the same denoise loop runs over torch, ONNX Runtime and TensorRT alike."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from fluxrt.components import ComponentSpec
from fluxrt.export.checkpoint import Checkpoint
from fluxrt.export.onnx_export import load_graph_module
from fluxrt.runtime.runners import Array, Runner


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, spec: ComponentSpec, precision: str, checkpoint: Checkpoint, device: str = "cpu"):
        super().__init__(spec, precision)
        self.checkpoint = checkpoint
        self.torch_device = torch.device(device)
        self.device = "cuda" if self.torch_device.type == "cuda" else "cpu"
        self.module: torch.nn.Module | None = None

    @classmethod
    def from_export_folder(cls, folder, name: str, device: str = "cpu") -> "TorchRunner":
        src = folder.manifest["source"]
        ckpt = Checkpoint.open(src["path"], transformer_file=src.get("transformer_file"), vae_file=src.get("vae_file"))
        return cls(folder.spec(name), folder.graph_precision(name), ckpt, device)

    def _activate(self) -> None:
        self.module = load_graph_module(self.name, self.checkpoint, self.precision).to(self.torch_device)

    def _deactivate(self) -> None:
        self.module = None

    def _infer(self, feed: Mapping[str, Array]) -> dict[str, Array]:
        args = [to_torch(feed[n], self.torch_device) for n in self.spec.input_names]
        with torch.no_grad():
            out = self.module(*args)
        outs = out if isinstance(out, tuple) else (out,)
        return {n: from_torch(t, self.device) for n, t in zip(self.spec.output_names, outs)}


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
