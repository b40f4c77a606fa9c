"""The export-time rewrites that keep the graphs portable (applied to our copies of the modules;
installed packages are never edited):

- ``torch.nn.RMSNorm`` (the transformer's query/key norms) -> an explicit float32 RMS norm.
  On torch 2.11 with CUDA in half precision ``nn.RMSNorm`` reaches the dynamo exporter as
  ``aten._fused_rms_norm``, which it cannot translate.
- diffusers' ``FluxPosEmbed`` computes rotary angles in float64; TensorRT has no float64, so
  the angles are computed in float32 (positions are integers below a few hundred: the angle
  error stays near 1e-5 rad).
"""

from __future__ import annotations

import torch
from torch import nn


class Float32RMSNorm(nn.Module):
    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        self.weight = norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        y = y.to(x.dtype)
        return y * self.weight if self.weight is not None else y


def rotary_angles(ids: torch.Tensor, theta: float, axes_dim: tuple[int, ...]) -> torch.Tensor:
    """FLUX's rotary angles in float32 for position ids [L, n_axes]: [L, sum(axes_dim)/2], one
    angle per rotated pair, the axes one after another."""
    angles = []
    for i, dim in enumerate(axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=ids.device) / dim)
        angles.append(ids[:, i : i + 1].float() * freqs)  # [L, dim/2]
    return torch.cat(angles, dim=-1)


class Float32Rotary(nn.Module):
    """FLUX's rotary embedding (cos, sin) for position ids [L, n_axes], in float32."""

    def __init__(self, theta: float, axes_dim: tuple[int, ...]):
        super().__init__()
        self.theta = float(theta)
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = rotary_angles(ids, self.theta, self.axes_dim)
        # each pair's angle twice, as diffusers' FluxPosEmbed lays them out: [L, sum(axes_dim)] each
        return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def make_portable(module: nn.Module) -> nn.Module:
    """Apply the rewrites above in place."""
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.RMSNorm):
                setattr(child, attr, Float32RMSNorm(sub))
            elif type(sub).__name__ == "FluxPosEmbed":
                setattr(child, attr, Float32Rotary(sub.theta, sub.axes_dim))
    return module
