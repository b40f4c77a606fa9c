"""The transformer graph for fluxrt's own ONNX Runtime kernels (``--attention ort-kernels``).

The fused ONNX Runtime graph (export/ort_fusions.py) leaves, per (1 double + 2 single) blocks at
1024x1024 on an H100, 2.7 ms of element-wise kernels where torch.compile spends 0.6 ms: bias adds,
RMS norms, rotary embedding, concatenations, LayerNorm modulation, gated residuals, fp16 clips,
each one ONNX Runtime kernel reading and writing the whole activation. Here the blocks are
rewritten around four custom ops (domain "fluxrt", kernels in runtime/ort_ops/fluxrt_ops.cu),
each one pass over memory, float32 inside:

- ``NormRope``: the query/key projections' bias add, per-head RMS norm and rotary embedding, and
  the joining of the text and image streams (the value projections: bias add and joining only);
- ``AdaLayerNorm``: ``LayerNorm(x) * (1 + scale) + shift`` (AdaLayerNormZero's modulation);
- ``GatedResidual``: ``residual + gate * (x [+ x2] + bias)``, with the fp16 clip when the model
  clips. The single blocks' output projection over ``cat(attention, mlp)`` becomes two matrix
  products summed here, so the 15360-wide concatenation is never written; their value bias is
  folded into that projection's bias (attention passes a bias on v through unchanged);
- ``BiasGelu``: the MLPs' bias add and tanh GELU (ONNX Runtime's FastGelu is not vectorized in
  bfloat16: twice the time).

The single blocks run as one stack on the joined [text; image] sequence, instead of joining and
splitting it around every block. Attention is ``com.microsoft.MultiHeadAttention`` as in the fused
graph; the matrix products stay MatMul (their biases land in the ops above).

Runs on ONNX Runtime with the library registered (runtime/ort_ops/), CPU (float32) or CUDA.
"""

from __future__ import annotations

import ast
import base64
import functools
import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fluxrt.components import ORT_OPS_DOMAIN
from fluxrt.errors import ExportError
from fluxrt.export.onnx_ops import ort_op
from fluxrt.export.ort_fusions import RotaryTables, attention

FP16_CLAMP = 65504.0  # diffusers clips fp16 block outputs to the float16 range


# ---- torch custom ops: the reference the kernels are tested against --------------------------------

@torch.library.custom_op("fluxrt::norm_rope", mutates_args=())
def norm_rope(x0: torch.Tensor, bias0: Optional[torch.Tensor], weight0: Optional[torch.Tensor],
              x1: Optional[torch.Tensor], bias1: Optional[torch.Tensor], weight1: Optional[torch.Tensor],
              cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], num_heads: int, epsilon: float) -> torch.Tensor:
    """x0 [B, L0, H*D] and x1 [B, L1, H*D] joined along the sequence; per head: + bias, RMS norm
    with ``weight`` (when given), rotary embedding with cos/sin [L0+L1, D/2] (when given)."""
    def head_rows(x, bias, weight):
        v = x.float() + (bias.float() if bias is not None else 0.0)
        v = v.unflatten(-1, (num_heads, -1))
        if weight is not None:
            v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + epsilon) * weight.float()
        return v

    v = head_rows(x0, bias0, weight0)
    if x1 is not None:
        v = torch.cat([v, head_rows(x1, bias1, weight1)], dim=1)
    if cos is not None:
        c, s = cos.float()[None, :, None, :], sin.float()[None, :, None, :]
        even, odd = v[..., 0::2], v[..., 1::2]
        v = torch.stack([even * c - odd * s, odd * c + even * s], dim=-1)
    return v.flatten(2).to(x0.dtype)


@norm_rope.register_fake
def _(x0, bias0, weight0, x1, bias1, weight1, cos, sin, num_heads, epsilon):
    if x1 is None:
        return torch.empty_like(x0)
    return x0.new_empty((x0.shape[0], x0.shape[1] + x1.shape[1], x0.shape[2]))


@torch.library.custom_op("fluxrt::ada_layer_norm", mutates_args=())
def ada_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, epsilon: float) -> torch.Tensor:
    """x [B, L, C]; scale, shift [B, C]: LayerNorm(x) * (1 + scale) + shift, float32 inside."""
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=epsilon)
    return (y * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


@ada_layer_norm.register_fake
def _(x, scale, shift, epsilon):
    return torch.empty_like(x)


@torch.library.custom_op("fluxrt::gated_residual", mutates_args=())
def gated_residual(residual: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], gate: torch.Tensor,
                   x2: Optional[torch.Tensor], clamp: float) -> torch.Tensor:
    """residual + gate[:, None] * (x + x2 + bias), clamped to ±clamp when clamp > 0."""
    v = x.float()
    if x2 is not None:
        v = v + x2.float()
    if bias is not None:
        v = v + bias.float()
    y = residual.float() + gate.float()[:, None] * v
    if clamp > 0:
        y = y.clamp(-clamp, clamp)
    return y.to(residual.dtype)


@gated_residual.register_fake
def _(residual, x, bias, gate, x2, clamp):
    return torch.empty_like(residual)


@torch.library.custom_op("fluxrt::bias_gelu", mutates_args=())
def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """GELU (tanh approximation) of x + bias, float32 inside."""
    v = x.float() + (bias.float() if bias is not None else 0.0)
    return F.gelu(v, approximate="tanh").to(x.dtype)


@bias_gelu.register_fake
def _(x, bias):
    return torch.empty_like(x)


# ---- module rewrites -------------------------------------------------------------------------------

class BareLinear(nn.Module):
    """A linear's matrix product alone: its bias (kept as ``.bias``) is added by the op that consumes
    the product. It takes the linear's place in the module tree, so the exported MatMul carries the
    linear's module path (FP8 quantization selects and names linears by it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def of(cls, layer: nn.Linear) -> "BareLinear":
        return cls(layer.weight, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _bare(owner: nn.Module, names: tuple[str, ...]) -> None:
    for n in names:
        setattr(owner, n, BareLinear.of(getattr(owner, n)))


def _eps(module, what: str) -> float:
    eps = getattr(module, "eps", None)
    if eps is None:
        raise ExportError(f"{what} has no eps; fluxrt's kernels need FLUX's LayerNorm/RMSNorm")
    return float(eps)


def _check_norms(attn, names: tuple[str, ...]) -> float:
    """The query/key RMS norms' common epsilon (one per NormRope op)."""
    eps = set()
    for n in names:
        norm = getattr(attn, n, None)
        if not isinstance(norm, nn.RMSNorm) or norm.weight is None:
            raise ExportError(f"attention {n} is {type(norm).__name__}, expected an nn.RMSNorm with a weight (FLUX)")
        eps.add(_eps(norm, n))
    if len(eps) != 1:
        raise ExportError(f"attention norms {names} have different epsilons {sorted(eps)}; one NormRope needs one")
    return eps.pop()


def _ff_layers(ff: nn.Module) -> tuple[BareLinear, BareLinear]:
    """diffusers' FeedForward as (input projection, output projection), tanh GELU between; both
    replaced in place by their BareLinear."""
    net = getattr(ff, "net", [])
    rest = [i for i, m in enumerate(net) if i and not isinstance(m, (nn.Dropout, nn.Identity))]
    if (not len(net) or not isinstance(getattr(net[0], "proj", None), nn.Linear) or len(rest) != 1
            or not isinstance(net[rest[0]], nn.Linear)):
        raise ExportError(f"feed-forward {type(ff).__name__} is not diffusers' [GELU(proj), Dropout, Linear]")
    _check_tanh_gelu(net[0], "feed-forward activation")
    _bare(net[0], ("proj",))
    net[rest[0]] = BareLinear.of(net[rest[0]])
    return net[0].proj, net[rest[0]]


def _check_tanh_gelu(module: nn.Module, what: str) -> None:
    if getattr(module, "approximate", None) != "tanh":
        raise ExportError(f"{what} is {type(module).__name__}(approximate={getattr(module, 'approximate', None)!r}); "
                          f"the BiasGelu kernel computes FLUX's tanh approximation")


def _no_kwargs(joint_attention_kwargs) -> None:
    if joint_attention_kwargs:
        raise ExportError(f"joint_attention_kwargs {sorted(joint_attention_kwargs)} (IP-Adapter, ...) are not "
                          f"supported by the ort-kernels export")


def _rotary(image_rotary_emb):
    if image_rotary_emb is None:
        return None, None
    return image_rotary_emb


class KernelDoubleBlock(nn.Module):
    """diffusers' FluxTransformerBlock through the fluxrt ops; same call and outputs."""

    def __init__(self, block: nn.Module):
        super().__init__()
        attn = block.attn
        if getattr(attn, "fused_projections", False) or attn.added_kv_proj_dim is None:
            raise ExportError("double block attention must have separate text projections and unfused QKV")
        self.eps_qk = _check_norms(attn, ("norm_q", "norm_k", "norm_added_q", "norm_added_k"))
        self.eps_ln = {n: _eps(getattr(block, n), n) for n in ("norm2", "norm2_context")}
        self.eps_ln.update({n: _eps(getattr(block, n).norm, f"{n}.norm") for n in ("norm1", "norm1_context")})
        self.block = block
        _bare(attn, ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"))
        attn.to_out[0] = BareLinear.of(attn.to_out[0])
        # a tuple, not submodules: the MLP linears keep their paths under block.ff / block.ff_context
        self.mlps = (_ff_layers(block.ff), _ff_layers(block.ff_context))

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        _no_kwargs(joint_attention_kwargs)
        b, attn = self.block, self.block.attn
        heads = attn.heads
        clamp = FP16_CLAMP if encoder_hidden_states.dtype == torch.float16 else 0.0
        mods = b.norm1.linear(b.norm1.silu(temb)).chunk(6, dim=1)
        cmods = b.norm1_context.linear(b.norm1_context.silu(temb)).chunk(6, dim=1)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = cmods

        x = ada_layer_norm(hidden_states, scale, shift, self.eps_ln["norm1"])
        cx = ada_layer_norm(encoder_hidden_states, c_scale, c_shift, self.eps_ln["norm1_context"])
        cos, sin = _rotary(image_rotary_emb)
        q = norm_rope(attn.add_q_proj(cx), attn.add_q_proj.bias, attn.norm_added_q.weight,
                      attn.to_q(x), attn.to_q.bias, attn.norm_q.weight, cos, sin, heads, self.eps_qk)
        k = norm_rope(attn.add_k_proj(cx), attn.add_k_proj.bias, attn.norm_added_k.weight,
                      attn.to_k(x), attn.to_k.bias, attn.norm_k.weight, cos, sin, heads, self.eps_qk)
        v = norm_rope(attn.add_v_proj(cx), attn.add_v_proj.bias, None,
                      attn.to_v(x), attn.to_v.bias, None, None, None, heads, self.eps_qk)
        out = attention(q, k, v, heads)
        text = encoder_hidden_states.shape[1]
        c_out, out = out.split_with_sizes([text, out.shape[1] - text], dim=1)

        h = gated_residual(hidden_states, attn.to_out[0](out), attn.to_out[0].bias, gate, None, 0.0)
        x = ada_layer_norm(h, scale_mlp, shift_mlp, self.eps_ln["norm2"])
        (ff_in, ff_out), (ffc_in, ffc_out) = self.mlps
        x = bias_gelu(ff_in(x), ff_in.bias)
        h = gated_residual(h, ff_out(x), ff_out.bias, gate_mlp, None, 0.0)

        e = gated_residual(encoder_hidden_states, attn.to_add_out(c_out), attn.to_add_out.bias, c_gate, None, 0.0)
        cx = ada_layer_norm(e, c_scale_mlp, c_shift_mlp, self.eps_ln["norm2_context"])
        cx = bias_gelu(ffc_in(cx), ffc_in.bias)
        e = gated_residual(e, ffc_out(cx), ffc_out.bias, c_gate_mlp, None, clamp)
        return e, h


class SplitProjection(nn.Module):
    """A single block's proj_out over cat(attention [C], mlp [M]) as its two column blocks (``attn``
    and ``mlp``, bare linears), with the value projection's bias folded into the bias: softmax
    weights sum to 1, so attention passes a bias on v straight through, and proj_out maps it to the
    constant W_attn @ b_v."""

    def __init__(self, proj: nn.Linear, attention_width: int, value_bias: torch.Tensor | None):
        super().__init__()
        w = proj.weight.detach()
        self.attn = BareLinear(w[:, :attention_width].contiguous(), None)
        self.mlp = BareLinear(w[:, attention_width:].contiguous(), None)
        bias = proj.bias.detach().float() if proj.bias is not None else torch.zeros(w.shape[0])
        if value_bias is not None:
            bias = bias + self.attn.weight.float() @ value_bias.detach().float()
        self.bias = nn.Parameter(bias.to(w.dtype), requires_grad=False)
        # what was folded, kept for the graph's metadata (tag_value_biases): a LoRA on proj_out changes W_attn,
        # so the runtime adds its update's W_attn part times this to the bias (plain attribute: not traced)
        self.value_bias = None if value_bias is None else value_bias.detach().float().cpu().clone()


VALUE_BIAS_KEY = "fluxrt.value_bias"  # metadata of a single block's attention-columns product (tag_value_biases)
SPLIT_SCOPE = re.compile(r"^(?:model\.)?single_transformer_blocks\.0\.proj\.(\d+)\.attn$")


def tag_value_biases(model, module: nn.Module) -> int:
    """Each single block's attention-columns MatMul in the exported ``model`` (onnx_ir) given the value bias folded
    into its block's bias, as ``fluxrt.value_bias``: little-endian float32, base64 (``"none"`` without one), so that
    a LoRA on ``proj_out`` can be merged at run time (runtime/lora.py). Returns how many were tagged."""
    stacks = [m for m in module.modules() if isinstance(m, KernelSingleStack)]
    if not stacks:
        return 0
    biases = {i: p.value_bias for i, p in enumerate(stacks[0].proj)}
    tagged = set()
    for node in model.graph:
        if node.op_type != "MatMul":
            continue
        try:
            scopes = ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            continue
        m = SPLIT_SCOPE.match(scopes[-2]) if len(scopes) >= 2 else None
        if m is None or int(m[1]) not in biases:
            continue
        value = biases[int(m[1])]
        node.metadata_props[VALUE_BIAS_KEY] = ("none" if value is None else
                                               base64.b64encode(value.numpy().astype("<f4").tobytes()).decode())
        tagged.add(int(m[1]))
    if tagged != set(biases):
        raise ExportError(f"single blocks {sorted(set(biases) - tagged)}: no attention-columns MatMul of proj_out "
                          f"found in the exported graph to record the folded value bias on")
    return len(tagged)


class KernelSingleStack(nn.Module):
    """All of diffusers' FluxSingleTransformerBlocks through the fluxrt ops, on the joined
    [text; image] sequence: called once where diffusers calls each block, same outputs."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.eps_qk, self.eps_ln, self.proj = [], [], nn.ModuleList()
        for i, blk in enumerate(blocks):
            self.eps_qk.append(_check_norms(blk.attn, ("norm_q", "norm_k")))
            self.eps_ln.append(_eps(blk.norm.norm, f"single block {i} norm"))
            width = blk.attn.to_q.out_features
            if blk.proj_out.in_features != width + blk.proj_mlp.out_features:
                raise ExportError(f"single block {i} proj_out takes {blk.proj_out.in_features} features, expected "
                                  f"attention {width} + mlp {blk.proj_mlp.out_features}")
            _check_tanh_gelu(blk.act_mlp, f"single block {i} act_mlp")
            self.proj.append(SplitProjection(blk.proj_out, width, blk.attn.to_v.bias))
            blk.proj_out = None  # its weight now lives in SplitProjection (no second copy)
            _bare(blk.attn, ("to_q", "to_k", "to_v"))
            _bare(blk, ("proj_mlp",))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        _no_kwargs(joint_attention_kwargs)
        cos, sin = _rotary(image_rotary_emb)
        clamp = FP16_CLAMP if hidden_states.dtype == torch.float16 else 0.0
        text = encoder_hidden_states.shape[1]
        h = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        for blk, proj, eps_qk, eps_ln in zip(self.blocks, self.proj, self.eps_qk, self.eps_ln):
            attn, heads = blk.attn, blk.attn.heads
            shift, scale, gate = blk.norm.linear(blk.norm.silu(temb)).chunk(3, dim=1)
            x = ada_layer_norm(h, scale, shift, eps_ln)
            mlp = bias_gelu(blk.proj_mlp(x), blk.proj_mlp.bias)
            q = norm_rope(attn.to_q(x), attn.to_q.bias, attn.norm_q.weight, None, None, None, cos, sin, heads, eps_qk)
            k = norm_rope(attn.to_k(x), attn.to_k.bias, attn.norm_k.weight, None, None, None, cos, sin, heads, eps_qk)
            out = attention(q, k, attn.to_v(x), heads)  # to_v's bias is in proj.bias
            h = gated_residual(h, proj.attn(out), proj.bias, gate, proj.mlp(mlp), clamp)
        return h[:, :text], h[:, text:]


def make_kernels(transformer: nn.Module) -> nn.Module:
    """Rewrite a diffusers FluxTransformer2DModel in place for the ort-kernels export."""
    names = ("transformer_blocks", "single_transformer_blocks", "pos_embed")
    missing = [n for n in names if not hasattr(transformer, n)]
    if missing:
        raise ExportError(f"{type(transformer).__name__} has no {missing}: not a diffusers FLUX transformer")
    pe = transformer.pos_embed
    transformer.pos_embed = RotaryTables(pe.theta, pe.axes_dim, torch.float32)  # the kernels read float32 tables
    transformer.transformer_blocks = nn.ModuleList(KernelDoubleBlock(b) for b in transformer.transformer_blocks)
    singles = list(transformer.single_transformer_blocks)
    transformer.single_transformer_blocks = nn.ModuleList([KernelSingleStack(singles)] if singles else [])
    return transformer


# ---- ONNX translations -----------------------------------------------------------------------------

@functools.cache
def _ops():
    from onnx.defs import OpSchema

    A = OpSchema.AttrType
    return {
        "norm_rope": ort_op(ORT_OPS_DOMAIN, "NormRope",
                            ["x0", "bias0?", "weight0?", "x1?", "bias1?", "weight1?", "cos?", "sin?"],
                            {"num_heads": A.INT, "epsilon": A.FLOAT}, float32_inputs=("cos", "sin")),
        "ada": ort_op(ORT_OPS_DOMAIN, "AdaLayerNorm", ["x", "scale", "shift"], {"epsilon": A.FLOAT}),
        "gated": ort_op(ORT_OPS_DOMAIN, "GatedResidual", ["residual", "x", "bias?", "gate", "x2?"],
                        {"clamp": A.FLOAT}),
        "gelu": ort_op(ORT_OPS_DOMAIN, "BiasGelu", ["x", "bias?"], {}),
    }


def _norm_rope(x0, bias0, weight0, x1, bias1, weight1, cos, sin, num_heads: int, epsilon: float):
    return _ops()["norm_rope"](x0, bias0, weight0, x1, bias1, weight1, cos, sin, num_heads=int(num_heads),
                               epsilon=float(epsilon))


def _ada_layer_norm(x, scale, shift, epsilon: float):
    return _ops()["ada"](x, scale, shift, epsilon=float(epsilon))


def _gated_residual(residual, x, bias, gate, x2, clamp: float):
    return _ops()["gated"](residual, x, bias, gate, x2, clamp=float(clamp))


def _bias_gelu(x, bias):
    return _ops()["gelu"](x, bias)


def kernels_table() -> dict:
    """``custom_translation_table`` entries for the ort-kernels export's custom ops."""
    ops = torch.ops.fluxrt
    return {ops.norm_rope.default: _norm_rope, ops.ada_layer_norm.default: _ada_layer_norm,
            ops.gated_residual.default: _gated_residual, ops.bias_gelu.default: _bias_gelu}
