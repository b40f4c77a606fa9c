"""torch modules with exactly the component specs' signatures, and the export-time rewrites
that keep the graphs portable.

Rewrites (applied to our wrapper copies only; installed packages are never edited):
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


class ClipGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):  # input_ids: [B, 77] int32
        out = self.model(input_ids=input_ids.long(), output_hidden_states=False)
        return out.last_hidden_state, out.pooler_output


class T5Graph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):  # input_ids: [B, S] int32
        return self.model(input_ids=input_ids.long(), output_hidden_states=False).last_hidden_state


class TransformerGraph(nn.Module):
    """``timestep`` and ``guidance`` come in float32 and are cast to the model dtype here, exactly
    where diffusers' pipeline casts them."""

    REWRITES = ("portable", "fused", "kernels", "none")

    def __init__(self, model: nn.Module, guidance: bool, rewrite: str = "portable"):
        """``rewrite``: "portable" (the rewrites above, any runtime), "fused" (ONNX Runtime's fused
        kernels, export/ort_fusions.py), "kernels" (fluxrt's own ONNX Runtime kernels on top,
        export/ort_kernels.py) or "none" (diffusers' modules as they are, for torch)."""
        super().__init__()
        if rewrite not in self.REWRITES:
            raise ValueError(f"rewrite {rewrite!r} is not one of {self.REWRITES}")
        self.dtype = next(model.parameters()).dtype
        if rewrite == "fused":
            from fluxrt.export.ort_fusions import make_fused

            model = make_fused(model, self.dtype)
        elif rewrite == "kernels":
            from fluxrt.export.ort_kernels import make_kernels

            model = make_kernels(model)
        elif rewrite == "portable":
            model = make_portable(model)
        self.model = model
        self.guidance = guidance

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):
        return self.model(
            hidden_states=hidden_states,  # [B, N, 64]
            encoder_hidden_states=encoder_hidden_states,  # [B, S, 4096]
            pooled_projections=pooled_projections,  # [B, 768]
            timestep=timestep.to(self.dtype),  # [B], sigma in [0, 1]
            img_ids=img_ids,  # [N, 3]
            txt_ids=txt_ids,  # [S, 3]
            guidance=guidance.to(self.dtype) if self.guidance else None,  # [B]
            return_dict=False,
        )[0]


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor):  # latent: [B, 16, h, w], already unscaled
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoderGraph(nn.Module):
    """Returns the posterior mean (the deterministic latent; callers add noise themselves)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor):  # images: [B, 3, H, W] in [-1, 1]
        return self.vae.encode(images, return_dict=False)[0].mode()
