"""The transformer graph for ONNX Runtime (``--attention ort``): every pattern that ONNX Runtime has
one fused CUDA kernel for reaches it as that one node.

Measured on an H100 (1 double + 2 single full-width blocks, 1024x1024, fp16, kernel time from
CUPTI), the portable graph with fused attention spent 12.2 ms on the GPU where torch.compile spent
6.7 ms; matrix products and attention cost the same in both (4.5 + 1.2 ms). The difference was
element-wise work torch.compile fuses into a few Triton kernels and the portable graph spells out
in float32: the query/key RMS norms (cast, pow, mean, add, sqrt, reciprocal, mul, cast, mul), the
rotary embedding (reshape, unbind, neg, stack, two casts, two muls, add, cast: the unbind alone is
a 0.5 ms strided split) and the adaptive LayerNorm modulation (LayerNorm, Mul, Add).

Here, at the module level (torch custom ops with a reference implementation, translated by the
dynamo exporter's ``custom_translation_table``):
- ``nn.RMSNorm`` -> ``SimplifiedLayerNormalization`` (ONNX Runtime's RMS norm, float32 inside);
- FLUX's rotary embedding -> ``com.microsoft.RotaryEmbedding`` (interleaved pairs), fed with
  cos/sin tables [L, head_dim/2] computed once per call in float32 and cast to the model dtype;
- attention -> ``com.microsoft.MultiHeadAttention`` on [B, L, H*D], no transposes.
And on the exported graph (an onnxscript rewrite rule):
- ``LayerNormalization(x) * s + t`` with per-sample s, t of shape [B, 1, C] -> one
  ``LayerNormalization(x, s, t)``: ONNX Runtime's kernel broadcasts a [B, 1, C] scale and bias.

None of this is TensorRT's business: the portable graph stays the default, and TensorRT fuses
the standard-op patterns itself.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from fluxrt.errors import ExportError
from fluxrt.export.onnx_ops import MSFT_DOMAIN, mha_op, ort_op
from fluxrt.export.portable import rotary_angles

# ---- torch custom ops: what the graph computes, and the reference ONNX Runtime must match --------

@torch.library.custom_op("fluxrt::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm over the last axis in float32, scaled by ``weight``, back in x's dtype."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("fluxrt::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """x [B, L, H*D]; cos, sin [L, D/2]. Rotates the pairs (x[2i], x[2i+1]) of every head by the
    angle of (cos[l, i], sin[l, i]): FLUX's interleaved rotary embedding."""
    b, L, hd = x.shape
    pairs = x.float().reshape(b, L, num_heads, hd // num_heads // 2, 2)
    c, s = cos.float()[None, :, None, :], sin.float()[None, :, None, :]
    even, odd = pairs[..., 0], pairs[..., 1]
    out = torch.stack([even * c - odd * s, odd * c + even * s], dim=-1)
    return out.reshape(b, L, hd).to(x.dtype)


@rotary.register_fake
def _(x, cos, sin, num_heads):
    return torch.empty_like(x)


@torch.library.custom_op("fluxrt::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Plain softmax attention on [B, L, H*D] tensors (scale 1/sqrt(D)); output [B, L, H*D]."""
    b, L, hd = q.shape
    split = lambda t: t.reshape(b, t.shape[1], num_heads, hd // num_heads).transpose(1, 2)  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, L, hd)


@attention.register_fake
def _(q, k, v, num_heads):
    return torch.empty_like(q)


# ---- module rewrites -------------------------------------------------------------------------------

class FusedRMSNorm(nn.Module):
    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        if norm.weight is None:
            raise ExportError("RMSNorm without a weight: FLUX's query/key norms have one")
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        self.weight = norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, float(self.eps))


class RotaryTables(nn.Module):
    """FLUX's position embedding as the half-width tables RotaryEmbedding reads: for position ids
    [L, n_axes], cos and sin [L, sum(axes_dim)/2] in ``dtype``; angles in float32."""

    def __init__(self, theta: float, axes_dim: tuple[int, ...], dtype: torch.dtype):
        super().__init__()
        self.theta = float(theta)
        self.axes_dim = tuple(axes_dim)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = rotary_angles(ids, self.theta, self.axes_dim)
        return angles.cos().to(self.dtype), angles.sin().to(self.dtype)


class FusedFluxAttnProcessor:
    """diffusers' FluxAttnProcessor computed through the custom ops above: projections, RMS norms
    per head, the text stream prepended, rotary embedding, attention, output projections."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        if attention_mask is not None:
            raise ExportError("FLUX attention with a mask cannot be exported with fused ONNX Runtime attention; "
                              "export with --attention portable")
        heads, dim = attn.heads, attn.head_dim

        def project(x, to_q, to_k, to_v, norm_q, norm_k):
            q, k, v = to_q(x), to_k(x), to_v(x)
            q = norm_q(q.unflatten(-1, (heads, dim))).flatten(2)
            k = norm_k(k.unflatten(-1, (heads, dim))).flatten(2)
            return q, k, v

        if getattr(attn, "fused_projections", False):
            raise ExportError("fused QKV projections (fuse_qkv_projections) are not supported by the fused ONNX "
                              "Runtime export; load the transformer without fusing them")
        q, k, v = project(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            eq, ek, ev = project(encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                                 attn.norm_added_q, attn.norm_added_k)
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            q, k = rotary(q, cos, sin, heads), rotary(k, cos, sin, heads)
        out = attention(q, k, v, heads)
        if not joint:
            return out
        text = encoder_hidden_states.shape[1]
        encoder_out, out = out.split_with_sizes([text, out.shape[1] - text], dim=1)
        out = attn.to_out[1](attn.to_out[0](out))
        return out, attn.to_add_out(encoder_out)


def make_fused(transformer: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Rewrite a diffusers FluxTransformer2DModel in place for the fused ONNX Runtime export."""
    for _, child in list(transformer.named_modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.RMSNorm):
                setattr(child, attr, FusedRMSNorm(sub))
            elif type(sub).__name__ == "FluxPosEmbed":
                setattr(child, attr, RotaryTables(sub.theta, sub.axes_dim, dtype))
    if not hasattr(transformer, "set_attn_processor"):
        raise ExportError(f"{type(transformer).__name__} has no set_attn_processor: not a diffusers FLUX transformer")
    transformer.set_attn_processor(FusedFluxAttnProcessor())
    return transformer


# ---- ONNX translations -----------------------------------------------------------------------------

@functools.cache
def _ops():
    from onnx.defs import OpSchema

    A = OpSchema.AttrType
    return {
        # ONNX Runtime registers its RMS norm in the default domain (version 1)
        "rms": ort_op("", "SimplifiedLayerNormalization", ["X", "scale"],
                      {"axis": A.INT, "epsilon": A.FLOAT, "stash_type": A.INT}),
        "rotary": ort_op(MSFT_DOMAIN, "RotaryEmbedding", ["input", "position_ids", "cos_cache", "sin_cache"],
                         {"interleaved": A.INT, "num_heads": A.INT}),
        "mha": mha_op(),
    }


def _rms_norm(x, weight, eps: float):
    return _ops()["rms"](x, weight, axis=-1, epsilon=float(eps), stash_type=1)


def _rotary(x, cos, sin, num_heads: int):
    from onnxscript import opset18 as op

    start = op.Constant(value_int=0)  # positions 0..L-1 index the per-token tables
    return _ops()["rotary"](x, start, cos, sin, interleaved=1, num_heads=int(num_heads))


def _attention(q, k, v, num_heads: int):
    heads = int(num_heads)
    hd = q.shape[2] if q.shape is not None and len(q.shape) == 3 else None
    if not isinstance(hd, int) or hd % heads:
        raise ExportError(f"fluxrt::attention: query width must be static and divisible by {heads} heads, "
                          f"got shape {q.shape}")
    return _ops()["mha"](q, k, v, num_heads=heads, scale=1.0 / math.sqrt(hd // heads))


def fused_table() -> dict:
    """``custom_translation_table`` entries for the custom ops of the fused export."""
    ops = torch.ops.fluxrt
    return {ops.rms_norm.default: _rms_norm, ops.rotary.default: _rotary, ops.attention.default: _attention}


# ---- graph rewrite: adaptive LayerNorm -------------------------------------------------------------

def _is_constant(value, fill: float) -> bool:
    import numpy as np

    const = value.const_value if value is not None else None
    if const is None:
        return False
    return bool(np.all(const.numpy() == fill))


def _per_sample(value) -> bool:
    """Shape [B, 1, C]: one scale (or shift) per sample and channel."""
    shape = value.shape
    return shape is not None and len(shape) == 3 and shape[1] == 1


def adaptive_layer_norm_rule():
    """``Add(Mul(LayerNormalization(x, ones), s), t)`` with s, t of shape [B, 1, C] ->
    ``LayerNormalization(x, s, t)``. The affine-free LayerNorm of FLUX's AdaLayerNormZero
    blocks, with the modulation ``* (1 + scale) + shift`` folded into it."""
    from onnxscript.rewriter import pattern

    def target(op, x, ones, s, t):
        ln = op.LayerNormalization(x, ones, _allow_other_inputs=False, _allow_other_attributes=True,
                                   _outputs=["ln"])
        return op.Add(op.Mul(ln, s), t)

    def condition(context, x, ones, s, t, ln, **_):
        node = ln.producer()
        axis = node.attributes.get_int("axis", -1)
        rank = len(x.shape) if x.shape is not None else None
        return (rank == 3 and axis in (-1, 2) and _is_constant(ones, 1.0) and _per_sample(s) and _per_sample(t)
                and s.shape[0] == t.shape[0] and s.shape[2] == t.shape[2])

    def replacement(op, x, ones, s, t, ln, **_):
        node = ln.producer()
        return op.LayerNormalization(x, s, t, axis=2, epsilon=node.attributes.get_float("epsilon", 1e-5),
                                     stash_type=node.attributes.get_int("stash_type", 1))

    return pattern.RewriteRule(target, replacement, condition)


def fuse_graph(model) -> dict[str, int]:
    """Apply the graph rewrites to an onnx_ir model in place; returns how often each applied."""
    from onnxscript.rewriter import pattern

    rules = pattern.RewriteRuleSet([adaptive_layer_norm_rule()], commute=True)
    count = rules.apply_to_model(model)
    return {"adaptive_layer_norm": int(count)}
