"""Black Forest Labs single-file checkpoints <-> diffusers state dicts.

BFL publishes FLUX.1 as ``flux1-dev.safetensors`` / ``flux1-schnell.safetensors`` (the transformer,
keys such as ``double_blocks.0.img_attn.qkv.weight``, sometimes under ``model.diffusion_model.``)
and ``ae.safetensors`` (the autoencoder, LDM-style keys such as ``encoder.down.0.block.0.conv1.weight``).

Each layout is described once, as a list of :class:`Rule` s built from the model's sizes; the tests
apply the same rules in the other direction (tests/bfl_writers.py) to write BFL files of their own.  Sizes are inferred from tensor shapes, so this works at any width
and depth, and on meta tensors (config inference from a file's header).  Every key of the input must
be consumed and every expected key present, or :class:`~fluxrt.errors.CheckpointError` names them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fluxrt.components import VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR
from fluxrt.errors import CheckpointError
from fluxrt.export.weights import check_keys

BFL_PREFIX = "model.diffusion_model."
BFL_NORM_GROUPS = 32  # BFL's autoencoder hard-codes GroupNorm(32, ...); the files do not record it
MLP_RATIO = 4  # diffusers' FluxTransformer2DModel fixes it; so does every FLUX.1 release

SAME, SPLIT, SWAP, CONV1X1 = "same", "split", "swap", "conv1x1"
TRANSFORMER_MARKS = ("double_blocks.", "single_blocks.", "img_in.")
VAE_MARKS = ("encoder.down.", "decoder.up.")


@dataclass(frozen=True)
class Rule:
    """One BFL tensor and the diffusers tensors it holds.

    ``same``: one tensor, unchanged.  ``split``: the BFL tensor is the diffusers tensors
    concatenated along dim 0, of ``sizes`` rows each.  ``swap``: BFL stores (shift, scale),
    diffusers (scale, shift).  ``conv1x1``: BFL's 1x1 conv weight [C, C, 1, 1] is diffusers'
    linear weight [C, C].
    """

    bfl: str
    diffusers: tuple[str, ...]
    op: str = SAME
    sizes: tuple[int, ...] = ()


def affine(bfl: str, diffusers: str | tuple[str, ...], op: str = SAME, sizes: tuple[int, ...] = ()) -> list[Rule]:
    """The weight and bias rules of one layer (a conv1x1 layer's bias is a plain vector)."""
    names = (diffusers,) if isinstance(diffusers, str) else diffusers
    return [Rule(f"{bfl}.weight", tuple(f"{d}.weight" for d in names), op, sizes),
            Rule(f"{bfl}.bias", tuple(f"{d}.bias" for d in names), SAME if op == CONV1X1 else op, sizes)]


def rms_scale(bfl: str, diffusers: str) -> Rule:
    return Rule(f"{bfl}.scale", (f"{diffusers}.weight",))


# ---- applying rules ---------------------------------------------------------------------------
def to_diffusers_tensors(rule: Rule, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if rule.op == SAME:
        return (t,)
    if rule.op == SPLIT:
        if t.shape[0] != sum(rule.sizes):
            raise CheckpointError(f"tensor {rule.bfl!r} has {t.shape[0]} rows, expected {sum(rule.sizes)} "
                                  f"(the rows of {list(rule.diffusers)}: {list(rule.sizes)})")
        return tuple(torch.split(t, list(rule.sizes), dim=0))
    if rule.op == SWAP:
        return (swap_halves(t, rule.bfl),)
    if t.ndim != 4 or tuple(t.shape[2:]) != (1, 1):
        raise CheckpointError(f"tensor {rule.bfl!r} has shape {tuple(t.shape)}, "
                              "expected a 1x1 conv weight [C, C, 1, 1]")
    return (t[:, :, 0, 0],)


def swap_halves(t: torch.Tensor, key: str) -> torch.Tensor:
    if t.shape[0] % 2:
        raise CheckpointError(f"tensor {key!r} has {t.shape[0]} rows, expected an even number (shift and scale halves)")
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def apply_to_diffusers(sd: dict[str, torch.Tensor], rules: list[Rule], what: str) -> dict[str, torch.Tensor]:
    check_keys(sd, {r.bfl for r in rules}, what)
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        out.update(zip(r.diffusers, to_diffusers_tensors(r, sd[r.bfl])))
    return out


# ---- reading sizes ------------------------------------------------------------------------------
def count_indexed(keys: Iterable[str], prefix: str) -> int:
    """How many distinct ``prefix.<i>.`` indices the keys use.  Counting them (not max + 1) makes a
    stray index show up as unexpected keys and a gap as missing ones."""
    head = prefix + "."
    found = {k[len(head):].split(".", 1)[0] for k in keys if k.startswith(head)}
    return sum(1 for i in found if i.isdigit())


def shape_of(sd: dict[str, torch.Tensor], key: str, what: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"{what}: tensor {key!r} is missing; the model's sizes are read from it")
    return tuple(sd[key].shape)


def detect_bfl_kind(keys: Iterable[str]) -> str:
    """``"transformer"`` or ``"vae"``, from the key names of a BFL single file."""
    names = sorted(k.removeprefix(BFL_PREFIX) for k in keys)
    kinds = [kind for kind, marks in (("transformer", TRANSFORMER_MARKS), ("vae", VAE_MARKS))
             if any(n.startswith(marks) for n in names)]
    if len(kinds) == 1:
        return kinds[0]
    found = "keys of both" if kinds else f"{len(names)} keys such as {names[:4]}"
    raise CheckpointError(
        f"not a Black Forest Labs single-file checkpoint: expected a transformer (keys under "
        f"{list(TRANSFORMER_MARKS)}, optionally prefixed {BFL_PREFIX!r}) or an autoencoder (keys under "
        f"{list(VAE_MARKS)}), found {found}")


def require_kind(sd: dict, kind: str) -> None:
    found = detect_bfl_kind(sd)
    if found != kind:
        raise CheckpointError(f"the state dict holds a BFL {found} checkpoint, expected the {kind}")


def strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    bare = sorted(k for k in sd if not k.startswith(BFL_PREFIX))
    if len(bare) == len(sd):
        return dict(sd)
    if bare:
        raise CheckpointError(f"BFL transformer: {len(sd) - len(bare)} keys carry the prefix {BFL_PREFIX!r} and "
                              f"{len(bare)} do not (e.g. {bare[:4]}); expected all or none")
    return {k.removeprefix(BFL_PREFIX): v for k, v in sd.items()}


# ---- transformer ------------------------------------------------------------------------------
@dataclass(frozen=True)
class FluxLayout:
    num_layers: int
    num_single_layers: int
    width: int  # hidden size = heads * head_dim
    guidance: bool

    def describe(self) -> str:
        return (f"{self.num_layers} double blocks, {self.num_single_layers} single blocks, width {self.width}, "
                f"{'with' if self.guidance else 'without'} a guidance embedder")


# per stream of a double block: BFL name -> diffusers (q, k, v, attention out, q norm, k norm, mlp, modulation)
DOUBLE_STREAMS = {
    "img": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.norm_q", "attn.norm_k", "ff", "norm1"),
    "txt": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "attn.norm_added_q",
            "attn.norm_added_k", "ff_context", "norm1_context"),
}


def double_block_rules(b: str, d: str, width: int) -> list[Rule]:
    rules = []
    for s, (q, k, v, out, norm_q, norm_k, ff, mod) in DOUBLE_STREAMS.items():
        rules += affine(f"{b}.{s}_mod.lin", f"{d}.{mod}.linear")
        rules += affine(f"{b}.{s}_attn.qkv", (f"{d}.{q}", f"{d}.{k}", f"{d}.{v}"), SPLIT, (width,) * 3)
        rules += [rms_scale(f"{b}.{s}_attn.norm.query_norm", f"{d}.{norm_q}"),
                  rms_scale(f"{b}.{s}_attn.norm.key_norm", f"{d}.{norm_k}")]
        rules += affine(f"{b}.{s}_attn.proj", f"{d}.{out}")
        rules += affine(f"{b}.{s}_mlp.0", f"{d}.{ff}.net.0.proj") + affine(f"{b}.{s}_mlp.2", f"{d}.{ff}.net.2")
    return rules


def single_block_rules(b: str, d: str, width: int) -> list[Rule]:
    qkv_mlp = (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp")
    return (affine(f"{b}.modulation.lin", f"{d}.norm.linear")
            + affine(f"{b}.linear1", qkv_mlp, SPLIT, (width,) * 3 + (MLP_RATIO * width,))
            + [rms_scale(f"{b}.norm.query_norm", f"{d}.attn.norm_q"),
               rms_scale(f"{b}.norm.key_norm", f"{d}.attn.norm_k")]
            + affine(f"{b}.linear2", f"{d}.proj_out"))


def transformer_rules(lay: FluxLayout) -> list[Rule]:
    embedders = {"time_in": "timestep_embedder", "vector_in": "text_embedder"}
    if lay.guidance:
        embedders["guidance_in"] = "guidance_embedder"
    rules = affine("img_in", "x_embedder") + affine("txt_in", "context_embedder")
    for b, d in embedders.items():
        rules += affine(f"{b}.in_layer", f"time_text_embed.{d}.linear_1")
        rules += affine(f"{b}.out_layer", f"time_text_embed.{d}.linear_2")
    for i in range(lay.num_layers):
        rules += double_block_rules(f"double_blocks.{i}", f"transformer_blocks.{i}", lay.width)
    for i in range(lay.num_single_layers):
        rules += single_block_rules(f"single_blocks.{i}", f"single_transformer_blocks.{i}", lay.width)
    return (rules + affine("final_layer.linear", "proj_out")
            + affine("final_layer.adaLN_modulation.1", "norm_out.linear", SWAP))


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """The rotary dims per position axis (index, row, column).  They are not stored in the weights:
    FLUX.1 uses (16, 56, 56) for heads of 128, and other head sizes keep those proportions."""
    a = head_dim // 8
    b = (head_dim - a) // 2
    axes = (a, b, b)
    if sum(axes) != head_dim or any(x <= 0 or x % 2 for x in axes):
        raise ValueError(f"attention head size {head_dim}: the rotary-axes rule (d // 8, then the rest halved) "
                         f"gives {axes}, expected positive even sizes summing to {head_dim}")
    return axes


def transformer_bfl_to_diffusers(sd: dict[str, torch.Tensor], axes_dims_rope=None) -> tuple[dict[str, torch.Tensor], dict]:
    """A BFL transformer (optionally under ``model.diffusion_model.``) as a diffusers
    ``FluxTransformer2DModel`` state dict, and the config to build that model with. ``axes_dims_rope``: the rotary
    axes (not in the weights; they must sum to the weights' head size), default FLUX.1's rule (:func:`rope_axes`)."""
    sd = strip_prefix(sd)
    require_kind(sd, "transformer")
    what = "BFL transformer"
    lay = FluxLayout(count_indexed(sd, "double_blocks"), count_indexed(sd, "single_blocks"),
                     shape_of(sd, "img_in.weight", what)[0], any(k.startswith("guidance_in.") for k in sd))
    converted = apply_to_diffusers(sd, transformer_rules(lay), f"{what} (expected {lay.describe()})")
    norm = "double_blocks.0.img_attn.norm" if lay.num_layers else "single_blocks.0.norm"
    head_dim = shape_of(sd, f"{norm}.query_norm.scale", what)[0]
    if lay.width % head_dim:
        raise CheckpointError(f"{what}: width {lay.width} (img_in.weight) is not a multiple of the attention head "
                              f"size {head_dim} ({norm}.query_norm.scale)")
    config = dict(
        patch_size=1,
        in_channels=shape_of(sd, "img_in.weight", what)[1],
        out_channels=shape_of(sd, "final_layer.linear.weight", what)[0],
        num_layers=lay.num_layers,
        num_single_layers=lay.num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=lay.width // head_dim,
        joint_attention_dim=shape_of(sd, "txt_in.weight", what)[1],
        pooled_projection_dim=shape_of(sd, "vector_in.in_layer.weight", what)[1],
        guidance_embeds=lay.guidance,
        axes_dims_rope=list(rope_axes(head_dim)) if axes_dims_rope is None else given_axes(axes_dims_rope, head_dim),
    )
    return converted, config


def given_axes(axes, head_dim: int) -> list[int]:
    if (not isinstance(axes, (list, tuple)) or len(axes) != 3
            or any(isinstance(a, bool) or not isinstance(a, int) or a <= 0 or a % 2 for a in axes)):
        raise CheckpointError(f"axes_dims_rope must be three positive even integers, got {axes!r}")
    if sum(axes) != head_dim:
        raise CheckpointError(f"axes_dims_rope {list(axes)} sums to {sum(axes)}, but the weights' attention head size "
                              f"is {head_dim}: the rotary axes must cover the head")
    return list(axes)


# ---- autoencoder ------------------------------------------------------------------------------
@dataclass(frozen=True)
class VaeLayout:
    channels: tuple[int, ...]  # block_out_channels, one per resolution level
    layers: int  # resnets per encoder level; each decoder level has one more
    quant_conv: bool
    post_quant_conv: bool

    def describe(self) -> str:
        convs = [n for n, present in (("quant_conv", self.quant_conv), ("post_quant_conv", self.post_quant_conv))
                 if present]
        return (f"channels {list(self.channels)}, {self.layers} resnets per level, "
                f"{' and '.join(convs) if convs else 'no quant_conv/post_quant_conv'}")


def resnet_rules(b: str, d: str, shortcut: bool) -> list[Rule]:
    rules = [r for n in ("norm1", "conv1", "norm2", "conv2") for r in affine(f"{b}.{n}", f"{d}.{n}")]
    return rules + (affine(f"{b}.nin_shortcut", f"{d}.conv_shortcut") if shortcut else [])


def mid_rules(side: str) -> list[Rule]:
    b, d = f"{side}.mid", f"{side}.mid_block"
    rules = resnet_rules(f"{b}.block_1", f"{d}.resnets.0", False)
    rules += resnet_rules(f"{b}.block_2", f"{d}.resnets.1", False)
    rules += affine(f"{b}.attn_1.norm", f"{d}.attentions.0.group_norm")
    for bn, dn in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        rules += affine(f"{b}.attn_1.{bn}", f"{d}.attentions.0.{dn}", CONV1X1)
    return rules


def encoder_rules(lay: VaeLayout) -> list[Rule]:
    rules = affine("encoder.conv_in", "encoder.conv_in")
    for i, ch in enumerate(lay.channels):
        ch_in = lay.channels[max(i - 1, 0)]
        for j in range(lay.layers):
            rules += resnet_rules(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                                  j == 0 and ch_in != ch)
        if i < len(lay.channels) - 1:
            rules += affine(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    return rules + mid_rules("encoder") + affine("encoder.norm_out", "encoder.conv_norm_out") + affine(
        "encoder.conv_out", "encoder.conv_out")


def decoder_rules(lay: VaeLayout) -> list[Rule]:
    """diffusers numbers the decoder's levels from the lowest resolution, BFL from the highest."""
    rules = affine("decoder.conv_in", "decoder.conv_in") + mid_rules("decoder")
    reversed_channels = lay.channels[::-1]
    for i, ch in enumerate(reversed_channels):
        level = len(lay.channels) - 1 - i
        ch_in = reversed_channels[max(i - 1, 0)]
        for j in range(lay.layers + 1):
            rules += resnet_rules(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}",
                                  j == 0 and ch_in != ch)
        if level > 0:
            rules += affine(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    return rules + affine("decoder.norm_out", "decoder.conv_norm_out") + affine("decoder.conv_out", "decoder.conv_out")


def vae_rules(lay: VaeLayout) -> list[Rule]:
    rules = encoder_rules(lay) + decoder_rules(lay)
    rules += affine("quant_conv", "quant_conv") if lay.quant_conv else []
    return rules + (affine("post_quant_conv", "post_quant_conv") if lay.post_quant_conv else [])


def vae_layout(sd: dict[str, torch.Tensor], levels: str, resnets: str, what: str) -> VaeLayout:
    """``levels``/``resnets``: the key patterns of the encoder's levels and of one level's resnets."""
    n = count_indexed(sd, levels)
    if n == 0:
        raise CheckpointError(f"{what}: no keys under '{levels}.<i>.', expected one group per resolution level")
    channels = tuple(shape_of(sd, f"{levels}.{i}.{resnets}.0.conv2.weight", what)[0] for i in range(n))
    return VaeLayout(channels, count_indexed(sd, f"{levels}.0.{resnets}"),
                     "quant_conv.weight" in sd, "post_quant_conv.weight" in sd)


def norm_groups(channels: tuple[int, ...], given: int | None) -> int:
    if given is None:
        if any(c % BFL_NORM_GROUPS for c in channels):
            raise CheckpointError(
                f"BFL autoencoder: norm_num_groups is not stored in the file; BFL's value {BFL_NORM_GROUPS} does not "
                f"divide the channel counts {list(channels)}, so BFL's code cannot build this autoencoder: "
                f"converting it needs norm_num_groups (a divisor of {math.gcd(*channels)})")
        return BFL_NORM_GROUPS
    if given <= 0 or any(c % given for c in channels):
        raise CheckpointError(f"norm_num_groups={given} does not divide the autoencoder's channel counts "
                              f"{list(channels)}")
    return given


def vae_bfl_to_diffusers(sd: dict[str, torch.Tensor], *, norm_num_groups: int | None = None,
                         scaling_factor: float = VAE_SCALING_FACTOR,
                         shift_factor: float | None = VAE_SHIFT_FACTOR) -> tuple[dict[str, torch.Tensor], dict]:
    """A BFL autoencoder as a diffusers ``AutoencoderKL`` state dict, and its config.

    GroupNorm's group count is not in the weights: ``norm_num_groups=None`` means BFL's 32, and is
    refused when 32 does not divide every channel count.  The latent scaling and shift are not in
    the file either; the defaults are FLUX.1's.
    """
    require_kind(sd, "vae")
    what = "BFL autoencoder"
    lay = vae_layout(sd, "encoder.down", "block", what)
    converted = apply_to_diffusers(sd, vae_rules(lay), f"{what} (expected {lay.describe()})")
    config = dict(
        in_channels=shape_of(sd, "encoder.conv_in.weight", what)[1],
        out_channels=shape_of(sd, "decoder.conv_out.weight", what)[0],
        down_block_types=["DownEncoderBlock2D"] * len(lay.channels),
        up_block_types=["UpDecoderBlock2D"] * len(lay.channels),
        block_out_channels=list(lay.channels),
        layers_per_block=lay.layers,
        latent_channels=shape_of(sd, "decoder.conv_in.weight", what)[1],
        norm_num_groups=norm_groups(lay.channels, norm_num_groups),
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=lay.quant_conv,
        use_post_quant_conv=lay.post_quant_conv,
    )
    return converted, config
