"""torch modules with exactly the component specs' signatures, and what each attention mode
(``fluxrt.components.ATTENTION_MODES``) does to the transformer: the module rewrite
(export/portable.py, export/ort_fusions.py, export/ort_kernels.py) and the exporter's translation
table for the custom ops it introduces."""

from __future__ import annotations

import torch
from torch import nn

from fluxrt.components import ATTENTION_MODES


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

    REWRITES = ATTENTION_MODES + ("none",)

    def __init__(self, model: nn.Module, guidance: bool, rewrite: str = "portable"):
        """``rewrite``: an attention mode -- "portable" (export/portable.py, any runtime), "ort" (ONNX
        Runtime's fused kernels, export/ort_fusions.py), "ort-kernels" (fluxrt's own ONNX Runtime
        kernels on top, export/ort_kernels.py) -- or "none" (diffusers' modules as they are, for torch)."""
        super().__init__()
        if rewrite not in self.REWRITES:
            raise ValueError(f"rewrite {rewrite!r} is not one of {self.REWRITES}")
        self.dtype = next(model.parameters()).dtype
        if rewrite == "ort":
            from fluxrt.export.ort_fusions import make_fused

            model = make_fused(model, self.dtype)
        elif rewrite == "ort-kernels":
            from fluxrt.export.ort_kernels import make_kernels

            model = make_kernels(model)
        elif rewrite == "portable":
            from fluxrt.export.portable import make_portable

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


def translation_table(attention: str) -> dict | None:
    """The exporter's ``custom_translation_table`` for an attention mode (None: torch's own).
    "ort" also translates the fused export's custom ops (export/ort_fusions.py), "ort-kernels"
    those of export/ort_kernels.py too."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention mode {attention!r} is not one of {ATTENTION_MODES}")
    if attention == "portable":
        return None
    from fluxrt.export.attention import ort_attention_table
    from fluxrt.export.ort_fusions import fused_table

    table = {**ort_attention_table(), **fused_table()}
    if attention == "ort-kernels":
        from fluxrt.export.ort_kernels import kernels_table

        table.update(kernels_table())
    return table
