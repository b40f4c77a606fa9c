"""LoRA files merged for good into the torch transformer before it is exported (``fluxrt export --lora``).

Each linear the files target gets ``W + Σ scaleᵢ·mᵢ·(upᵢ @ downᵢ)``: float32 from the weight as loaded (in the
export's precision), the files added in the order given, cast once back. That is the runtime's merge over the
same weights in an export without them (runtime/lora.py), so both give the same graph weights, bit for bit.
The manifest's transformer record lists each file's path, sha256, layout and scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from fluxrt.lora import LoraFile, read_lora

Loras = Sequence[tuple[LoraFile, float]]  # (file, scale), in merge order


def read_loras(pairs: Sequence[tuple[str, float]], config: Mapping) -> list[tuple[LoraFile, float]]:
    """Each ``(path, scale)`` read and checked against the transformer of ``config`` (before any export work)."""
    return [(read_lora(path, config), float(scale)) for path, scale in pairs]


def merge_loras(model: torch.nn.Module, loras: Loras) -> None:
    """Merge ``loras`` into the linears of diffusers' transformer ``model``, in place."""
    for module in sorted({m for lora, _ in loras for m in lora.deltas}):
        linear = model.get_submodule(module)
        w = linear.weight.detach().to("cpu", torch.float32).numpy().copy()  # [out, in]
        for lora, scale in loras:
            if module in lora.deltas:
                w += lora.deltas[module].matrix(scale)
        linear.weight.data = torch.from_numpy(w).to(linear.weight.device, linear.weight.dtype)


def lora_records(loras: Loras) -> list[dict]:
    """The manifest's account of merged LoRA files."""
    return [{"path": str(Path(lora.path).resolve()), "sha256": lora.sha256, "layout": lora.layout, "scale": scale}
            for lora, scale in loras]
