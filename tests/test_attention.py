"""The ONNX Runtime attention table: every SDPA becomes one com.microsoft.MultiHeadAttention,
the portable export keeps standard ops, and the fused graph equals diffusers' own transformer
(ONNX Runtime CPU against torch eager) at two sizes of every dynamic axis."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fluxrt.components import ModelDims, component_spec
from fluxrt.errors import ExportError
from fluxrt.export import onnx_export
from fluxrt.export.attention import count_attention_nodes, ort_attention_table
from fluxrt.export.graphs import TransformerGraph, translation_table
from fluxrt.export.onnx_ops import MSFT_DOMAIN
from fluxrt.export.ort_fusions import fuse_graph
from fluxrt.export.tiny import perturb
from fluxrt.export.weights import TORCH_DTYPES

TINY = dict(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2, in_channels=64,
            joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 14, 14))
DIMS = ModelDims("dev", clip_hidden_size=32, t5_d_model=32, joint_attention_dim=32, pooled_projection_dim=32)
# (batch, latent token rows, latent token columns, text length): N = rows * columns; every axis differs
SHAPES = [(1, 3, 5, 4), (3, 4, 4, 9)]
FP32_TOL = dict(rtol=1e-4, atol=1e-4)


def make_reference():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return perturb(FluxTransformer2DModel(**TINY), torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference():
    """The unmodified diffusers transformer, seeded; exports wrap deep copies of it."""
    return make_reference()


def wrapped(model, precision: str, rewrite: str = "portable") -> TransformerGraph:
    """The exporter's module: a copy of ``model`` in ``precision`` with the export's rewrites."""
    return TransformerGraph(copy.deepcopy(model).to(TORCH_DTYPES[precision]), guidance=True,
                            rewrite=rewrite).eval()


def export(module: TransformerGraph, precision: str, table: dict | None, path, fuse: bool = False) -> str:
    spec = component_spec("transformer", DIMS)
    with torch.no_grad():
        program = torch.onnx.export(
            module, onnx_export.example_inputs(spec, DIMS, precision), dynamo=True,
            opset_version=onnx_export.opset_for(precision), input_names=spec.input_names,
            output_names=spec.output_names, dynamic_shapes=onnx_export.dynamic_shapes(spec, DIMS),
            custom_translation_table=table, verbose=False,
        )
    if fuse:
        fuse_graph(program.model)
    program.save(str(path))
    return str(path)


def export_graph(model, name: str, root) -> str:
    """``root``/NAME.onnx: portable: standard ops; sdpa: portable modules with only attention fused (the
    table alone); fused / fused_fp16: what ``fluxrt export --attention ort`` writes."""
    path = Path(root) / f"{name}.onnx"
    if name == "sdpa":
        return export(wrapped(model, "fp32"), "fp32", ort_attention_table(), path)
    if name == "portable":
        return export(wrapped(model, "fp32"), "fp32", translation_table("portable"), path)
    precision = {"fused": "fp32", "fused_fp16": "fp16"}[name]
    return export(wrapped(model, precision, "ort"), precision, translation_table("ort"), path, fuse=True)


# the fused graphs are exported from make_reference() in a child process while this one exports the others
# (an export uses one core); the same seeded weights there, as the equality tests below check
EXPORT_IN_CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); import test_attention as t; "
                   "model = t.make_reference(); [t.export_graph(model, name, sys.argv[2]) for name in sys.argv[3:]]")


@pytest.fixture(scope="module")
def graphs(reference, tmp_path_factory) -> dict[str, str]:
    from child_process import Child

    root = tmp_path_factory.mktemp("attention")
    in_child = ["fused", "fused_fp16"]
    with Child(EXPORT_IN_CHILD, Path(__file__).parent, root, *in_child) as child:
        out = {name: export_graph(reference, name, root) for name in ("sdpa", "portable")}
        child.wait()
    return dict(out, **{name: str(root / f"{name}.onnx") for name in in_child})


def feeds(batch: int, rows: int, cols: int, text: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.zeros((rows, cols, 3), np.float32)
    ids[..., 1] += np.arange(rows)[:, None]
    ids[..., 2] += np.arange(cols)[None, :]
    return {
        "hidden_states": rng.standard_normal((batch, rows * cols, DIMS.in_channels)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, text, DIMS.joint_attention_dim)).astype(np.float32),
        "pooled_projections": rng.standard_normal((batch, DIMS.pooled_projection_dim)).astype(np.float32),
        "timestep": rng.uniform(0, 1, batch).astype(np.float32),
        "img_ids": ids.reshape(-1, 3),
        "txt_ids": np.zeros((text, 3), np.float32),
        "guidance": rng.uniform(1, 5, batch).astype(np.float32),
    }


def torch_output(model, feed: dict) -> np.ndarray:
    """Called the way diffusers' FluxPipeline calls it."""
    t = {k: torch.from_numpy(v) for k, v in feed.items()}
    with torch.no_grad():
        return model(**t, return_dict=False)[0].float().numpy()


def half_feed(feed: dict) -> dict:
    """The fp16 graph's feed: activations in float16, timestep, guidance and ids stay float32."""
    return {k: v.astype(np.float16) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
            for k, v in feed.items()}


def ort_output(path: str, feed: dict) -> np.ndarray:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_fused_graph_has_one_attention_node_per_block(graphs):
    assert count_attention_nodes(graphs["sdpa"]) == {"MultiHeadAttention": 2, "Softmax": 0}
    assert count_attention_nodes(graphs["fused"]) == {"MultiHeadAttention": 2, "Softmax": 0}
    assert count_attention_nodes(graphs["fused_fp16"]) == {"MultiHeadAttention": 2, "Softmax": 0}
    heads = [a.i for n in onnx.load(graphs["fused"]).graph.node if n.op_type == "MultiHeadAttention"
             for a in n.attribute if a.name == "num_heads"]
    assert heads == [TINY["num_attention_heads"]] * 2


def test_portable_graph_keeps_standard_ops(graphs):
    """What TensorRT gets: it cannot parse com.microsoft ops, and fuses MatMul-Softmax-MatMul itself."""
    assert count_attention_nodes(graphs["portable"]) == {"MultiHeadAttention": 0, "Softmax": 2}
    model = onnx.load(graphs["portable"])
    assert MSFT_DOMAIN not in {o.domain for o in model.opset_import}
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}


@pytest.mark.parametrize("graph", ["sdpa", "fused"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}-N{r * c}-S{s}" for b, r, c, s in SHAPES])
def test_fused_graph_equals_diffusers(graphs, reference, shape, graph):
    feed = feeds(*shape)
    np.testing.assert_allclose(ort_output(graphs[graph], feed), torch_output(reference, feed), **FP32_TOL)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}-N{r * c}-S{s}" for b, r, c, s in SHAPES])
def test_fused_fp16_graph_runs_on_ort_cpu(graphs, reference, shape):
    """ONNX Runtime's CPU kernel takes MultiHeadAttention in float16 too. The whole fp16 graph
    differs from the fp32 model by up to ~0.1 on outputs of ~2.5, as much as the fp32 model fed
    fp16-rounded weights and inputs does: fp16 arithmetic, not attention (checked tightly below)."""
    feed = feeds(*shape)
    out = ort_output(graphs["fused_fp16"], half_feed(feed))
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float32), torch_output(reference, feed), rtol=0, atol=0.2)


class Attend(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v):  # each [B, H, L, D]
        return self.fn(q, k, v)


aten = torch.ops.aten
# Backend-specific ops that SDPA becomes on other devices; fake tensors let CPU trace them all.
VARIANTS = {
    "sdpa": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3),
    "flash_cpu": lambda q, k, v: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0],
    "flash": lambda q, k, v: aten._scaled_dot_product_flash_attention(q, k, v)[0],
    "efficient": lambda q, k, v: aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0],
    "cudnn": lambda q, k, v: aten._scaled_dot_product_cudnn_attention(q, k, v, None, False)[0],
    "overrideable": lambda q, k, v: aten._scaled_dot_product_fused_attention_overrideable(q, k, v)[0],
}


def export_attention(fn, path, dtype=torch.float32) -> str:
    from torch.export import Dim

    qkv = tuple(torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(i), dtype=dtype) for i in range(3))
    batch, length = Dim("B"), Dim("L")
    torch.onnx.export(Attend(fn), qkv, dynamo=True, input_names=["q", "k", "v"], verbose=False,
                      dynamic_shapes={n: {0: batch, 2: length} for n in "qkv"},
                      custom_translation_table=ort_attention_table()).save(str(path))
    return str(path)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_sdpa_variant_becomes_multi_head_attention(variant, tmp_path):
    path = export_attention(VARIANTS[variant], tmp_path / "attention.onnx")
    assert count_attention_nodes(path) == {"MultiHeadAttention": 1, "Softmax": 0}
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 3, 7, 8, generator=g) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3 if variant == "sdpa" else None)
    got = ort_output(path, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})
    np.testing.assert_allclose(got, want.numpy(), **FP32_TOL)


def test_fp16_attention_matches_torch(tmp_path):
    """MultiHeadAttention in float16 on ORT CPU against torch's SDPA in float32 on the same
    fp16 values: only the output's rounding to fp16 differs."""
    path = export_attention(VARIANTS["sdpa"], tmp_path / "attention.onnx", torch.float16)
    assert count_attention_nodes(path) == {"MultiHeadAttention": 1, "Softmax": 0}
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 3, 7, 8, generator=g).half() for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.3)
    got = ort_output(path, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want.numpy(), rtol=1e-3, atol=1e-3)


def test_unsupported_attention_is_refused_by_name(tmp_path):
    causal = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    with pytest.raises(Exception) as info:
        export_attention(causal, tmp_path / "causal.onnx")
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__
    errors = [e for e in chain if isinstance(e, ExportError)]
    assert errors, f"no ExportError in {[type(e).__name__ for e in chain]}"
    assert "aten::scaled_dot_product_attention" in str(errors[0]) and "['is_causal']" in str(errors[0])
    assert "portable" in str(errors[0])


def test_attention_mode_is_checked():
    assert translation_table("portable") is None
    with pytest.raises(ValueError, match=r"attention mode 'trt' is not one of \('portable', 'ort', 'ort-kernels'\)"):
        translation_table("trt")
