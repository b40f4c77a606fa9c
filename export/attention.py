"""Attention as one fused ONNX Runtime node: a translation table for the dynamo exporter that
turns every scaled-dot-product-attention call into ``com.microsoft.MultiHeadAttention``.

Two export modes, chosen per export:
- portable (the default, no table): torch's own translation, MatMul -> Softmax -> MatMul in
  standard ONNX ops. This is the graph for TensorRT, which fuses that pattern into its own
  attention kernels and cannot parse ``com.microsoft`` ops at all.
- fused (``custom_translation_table=ort_attention_table()``): for ONNX Runtime only. Its CUDA
  kernel runs flash or memory-efficient attention, where the decomposed graph materialises the
  [B, H, L, L] scores and ran 1.4x slower than torch eager on an H100. ``fluxrt export
  --attention ort`` goes further for the transformer (export/ort_fusions.py: its own attention
  processor, fused RMS norms, rotary embedding and adaptive LayerNorm); this table still covers
  SDPA wherever it appears.

MultiHeadAttention wants a 3D query [B, S, H*D] (a 4D BNSH query is refused) and key/value as
[B, L, H*D] or both BNSH [B, H, L, D] (meant for cross-attention over a cache). All three go in
as [B, L, H*D], its plain self-attention layout. FLUX's projections arrive as [B, L, H, D]
transposed to [B, H, L, D], so the transposes added here cancel against those: the exported
transformer has no Transpose left around attention.

Which aten op reaches the exporter: ``torch.export`` keeps ``aten.scaled_dot_product_attention``
whole, and the exporter does not decompose ops it has a translation for. Seen for fp32 and fp16
on CPU (torch 2.13) and for bf16 and fp16 on an H100 (torch 2.11). The backend-specific ops
appear only in a program decomposed before translation: ``run_decompositions()`` turned it into
``_scaled_dot_product_cudnn_attention`` on the H100, and into plain softmax math on CPU. Those
ops (``_flash_attention_for_cpu``, ``_flash_attention``, ``_efficient_attention``,
``_cudnn_attention``, ``_fused_attention_overrideable``) are translated the same way, so the
table holds wherever and however the export runs.
"""

from __future__ import annotations

from pathlib import Path

from fluxrt.errors import ExportError
from fluxrt.export.onnx_ops import MSFT_DOMAIN, mha_op


def _unsupported(op_name: str, attn_mask, dropout_p: float, is_causal: bool, enable_gqa: bool = False) -> None:
    """FLUX attention has no mask, no dropout at inference, no causality and equal head counts;
    anything else would need MultiHeadAttention inputs this translation does not wire up."""
    given = dict(attn_mask=attn_mask is not None, dropout_p=dropout_p != 0.0, is_causal=bool(is_causal),
                 enable_gqa=bool(enable_gqa))
    bad = [name for name, present in given.items() if present]
    if bad:
        raise ExportError(f"{op_name}: fused MultiHeadAttention export supports plain attention only "
                          f"(no mask, dropout, causal or grouped-query); got {bad}. Export without "
                          f"the ONNX Runtime attention table (portable mode) instead")


def _static_heads(op_name: str, query, key, value) -> tuple[int, int]:
    """(num_heads, head_dim) from the static dims of q: [B, H, L, D]; MultiHeadAttention takes
    num_heads as an attribute, so H and D must be known at export time."""
    shapes = {"query": query.shape, "key": key.shape, "value": value.shape}
    for name, shape in shapes.items():
        if shape is None or len(shape) != 4:
            raise ExportError(f"{op_name}: {name} must be 4D [B, H, L, D], got shape {shape}")
    heads, head_dim = query.shape[1], query.shape[3]
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise ExportError(f"{op_name}: query heads and head dim must be static, got shape {query.shape}")
    for name in ("key", "value"):
        if shapes[name][1] != heads or shapes[name][3] != head_dim:
            raise ExportError(f"{op_name}: {name} shape {shapes[name]} must have {heads} heads of "
                              f"{head_dim} like query {query.shape}")
    return heads, head_dim


def _mha(op_name: str, query, key, value, scale: float | None):
    """q, k, v: [B, H, L, D] -> attention output [B, H, L, D], through one MultiHeadAttention."""
    from onnxscript import opset18 as op

    heads, head_dim = _static_heads(op_name, query, key, value)
    to_bsd = op.Constant(value_ints=[0, 0, heads * head_dim])  # 0 keeps B and L, which are dynamic
    q, k, v = (op.Reshape(op.Transpose(t, perm=[0, 2, 1, 3]), to_bsd) for t in (query, key, value))
    attrs = {"num_heads": heads} if scale is None else {"num_heads": heads, "scale": float(scale)}
    out = mha_op()(q, k, v, **attrs)  # [B, L, H*D]
    out = op.Reshape(out, op.Constant(value_ints=[0, 0, heads, head_dim]))
    return op.Transpose(out, perm=[0, 2, 1, 3])


def _unused_outputs(count: int) -> tuple:
    """Placeholders for a fused kernel's auxiliary outputs (logsumexp, RNG state, ...), which
    no inference graph reads; the exporter drops them as dead code."""
    from onnxscript import opset18 as op

    return tuple(op.Constant(value_float=0.0) for _ in range(count))


# Parameter names and order follow each op's schema: the exporter binds the fx node's
# arguments to these by name. Tensors are left unannotated (inputs), the rest are attributes.

def sdpa(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
         scale: float | None = None, enable_gqa: bool = False):
    _unsupported("aten::scaled_dot_product_attention", attn_mask, dropout_p, is_causal, enable_gqa)
    return _mha("aten::scaled_dot_product_attention", query, key, value, scale)


def sdpa_flash_cpu(query, key, value, dropout_p: float = 0.0, is_causal: bool = False, attn_mask=None,
                   scale: float | None = None):
    _unsupported("aten::_scaled_dot_product_flash_attention_for_cpu", attn_mask, dropout_p, is_causal)
    out = _mha("aten::_scaled_dot_product_flash_attention_for_cpu", query, key, value, scale)
    return (out, *_unused_outputs(1))


def sdpa_flash(query, key, value, dropout_p: float = 0.0, is_causal: bool = False,
               return_debug_mask: bool = False, scale: float | None = None):
    _unsupported("aten::_scaled_dot_product_flash_attention", None, dropout_p, is_causal)
    out = _mha("aten::_scaled_dot_product_flash_attention", query, key, value, scale)
    return (out, *_unused_outputs(8))


def sdpa_efficient(query, key, value, attn_bias, compute_log_sumexp: bool, dropout_p: float = 0.0,
                   is_causal: bool = False, scale: float | None = None):
    _unsupported("aten::_scaled_dot_product_efficient_attention", attn_bias, dropout_p, is_causal)
    out = _mha("aten::_scaled_dot_product_efficient_attention", query, key, value, scale)
    return (out, *_unused_outputs(3))


def sdpa_cudnn(query, key, value, attn_bias, compute_log_sumexp: bool, dropout_p: float = 0.0,
               is_causal: bool = False, return_debug_mask: bool = False, scale: float | None = None):
    _unsupported("aten::_scaled_dot_product_cudnn_attention", attn_bias, dropout_p, is_causal)
    out = _mha("aten::_scaled_dot_product_cudnn_attention", query, key, value, scale)
    return (out, *_unused_outputs(8))


def sdpa_overrideable(query, key, value, attn_bias=None, dropout_p: float = 0.0, is_causal: bool = False,
                      return_debug_mask: bool = False, scale: float | None = None):
    _unsupported("aten::_scaled_dot_product_fused_attention_overrideable", attn_bias, dropout_p, is_causal)
    out = _mha("aten::_scaled_dot_product_fused_attention_overrideable", query, key, value, scale)
    return (out, *_unused_outputs(8))


def ort_attention_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: every SDPA
    variant -> one ``com.microsoft.MultiHeadAttention``. ONNX Runtime only; see the module doc."""
    import torch

    aten = torch.ops.aten
    return {
        aten.scaled_dot_product_attention.default: sdpa,
        aten._scaled_dot_product_flash_attention_for_cpu.default: sdpa_flash_cpu,
        aten._scaled_dot_product_flash_attention.default: sdpa_flash,
        aten._scaled_dot_product_efficient_attention.default: sdpa_efficient,
        aten._scaled_dot_product_cudnn_attention.default: sdpa_cudnn,
        aten._scaled_dot_product_fused_attention_overrideable.default: sdpa_overrideable,
    }


def count_attention_nodes(onnx_path: str | Path) -> dict[str, int]:
    """How many ``com.microsoft.MultiHeadAttention`` and ``Softmax`` nodes the graph holds,
    counting inside local functions too."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return {
        "MultiHeadAttention": sum(n.op_type == "MultiHeadAttention" and n.domain == MSFT_DOMAIN for n in nodes),
        "Softmax": sum(n.op_type == "Softmax" and n.domain in ("", "ai.onnx") for n in nodes),
    }
