"""Test helper: diffusers state dicts -> Black Forest Labs' single-file layouts, with the rules of
fluxrt.export.bfl applied in the other direction, so the tests can write BFL files of their own."""

from __future__ import annotations

import torch

from fluxrt.errors import CheckpointError
from fluxrt.export.bfl import (
    SAME, SPLIT, SWAP, FluxLayout, Rule, count_indexed, shape_of, swap_halves, transformer_rules, vae_layout,
    vae_rules,
)
from fluxrt.export.weights import check_keys


def to_bfl_tensor(rule: Rule, ts: list[torch.Tensor]) -> torch.Tensor:
    if rule.op == SAME:
        return ts[0]
    if rule.op == SPLIT:
        rows = [t.shape[0] for t in ts]
        if rows != list(rule.sizes):
            raise CheckpointError(f"tensors {list(rule.diffusers)} have {rows} rows, expected {list(rule.sizes)}")
        return torch.cat(ts, dim=0)
    if rule.op == SWAP:
        return swap_halves(ts[0], rule.diffusers[0])
    if ts[0].ndim != 2:
        raise CheckpointError(f"tensor {rule.diffusers[0]!r} has shape {tuple(ts[0].shape)}, "
                              "expected a linear weight [C, C]")
    return ts[0][:, :, None, None]


def apply_to_bfl(sd: dict[str, torch.Tensor], rules: list[Rule], what: str) -> dict[str, torch.Tensor]:
    check_keys(sd, {k for r in rules for k in r.diffusers}, what)
    return {r.bfl: to_bfl_tensor(r, [sd[k] for k in r.diffusers]) for r in rules}


def transformer_diffusers_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The exact inverse of :func:`transformer_bfl_to_diffusers` (keys without prefix)."""
    what = "diffusers FluxTransformer2DModel"
    lay = FluxLayout(count_indexed(sd, "transformer_blocks"), count_indexed(sd, "single_transformer_blocks"),
                     shape_of(sd, "x_embedder.weight", what)[0],
                     any(k.startswith("time_text_embed.guidance_embedder.") for k in sd))
    return apply_to_bfl(sd, transformer_rules(lay), f"{what} (expected {lay.describe()})")


def vae_diffusers_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The exact inverse of :func:`vae_bfl_to_diffusers`."""
    what = "diffusers AutoencoderKL"
    lay = vae_layout(sd, "encoder.down_blocks", "resnets", what)
    return apply_to_bfl(sd, vae_rules(lay), f"{what} (expected {lay.describe()})")
