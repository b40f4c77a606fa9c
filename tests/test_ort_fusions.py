"""The fused ONNX Runtime transformer (export/ort_fusions.py): its custom ops against diffusers'
own functions, the adaptive-LayerNorm rewrite on small graphs (where it must apply and where it
must not), and the op census of an exported fused transformer."""

from __future__ import annotations

import collections
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from fluxrt.errors import ExportError
from fluxrt.export import ort_fusions
from fluxrt.export.tiny import perturb

TINY = dict(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2, in_channels=64,
            joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 14, 14))


def ids(rows: int = 3, cols: int = 5, text: int = 4) -> torch.Tensor:
    img = torch.zeros(rows, cols, 3)
    img[..., 1] += torch.arange(rows)[:, None]
    img[..., 2] += torch.arange(cols)[None, :]
    return torch.cat([torch.zeros(text, 3), img.reshape(-1, 3)])


def test_rotary_equals_diffusers_apply_rotary_emb():
    from diffusers.models.embeddings import FluxPosEmbed, apply_rotary_emb

    pos = ids()
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[4, 14, 14])(pos)  # [L, 32], float64 angles
    x = torch.randn(2, pos.shape[0], 3, 32, generator=torch.Generator().manual_seed(0))  # [B, L, H, D]
    want = apply_rotary_emb(x, (cos, sin), sequence_dim=1)
    half_cos, half_sin = ort_fusions.RotaryTables(10000, (4, 14, 14), torch.float32)(pos)
    np.testing.assert_allclose(half_cos.numpy(), cos[:, ::2].float().numpy(), atol=2e-6)
    got = ort_fusions.rotary(x.flatten(2), half_cos, half_sin, 3).unflatten(-1, (3, 32))
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_torch(dtype):
    norm = torch.nn.RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 32))
    x = torch.randn(2, 7, 3, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = norm(x).to(dtype)
        got = ort_fusions.FusedRMSNorm(norm.to(dtype))(x.to(dtype))
    assert got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    np.testing.assert_allclose(got.float().numpy(), want.float().numpy(), rtol=tol, atol=tol)


def test_attention_op_equals_sdpa():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 9, 4 * 8, generator=g) for _ in range(3))
    split = lambda t: t.unflatten(-1, (4, 8)).transpose(1, 2)  # noqa: E731
    want = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)
    np.testing.assert_allclose(ort_fusions.attention(q, k, v, 4).numpy(), want.numpy(), rtol=1e-6, atol=1e-6)


def test_fused_modules_equal_diffusers_in_torch():
    """The rewritten transformer (custom ops run their torch references) against the original."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = perturb(FluxTransformer2DModel(**TINY), torch.Generator().manual_seed(0)).eval()
    fused = ort_fusions.make_fused(copy.deepcopy(model), torch.float32)
    g = torch.Generator().manual_seed(3)
    args = dict(hidden_states=torch.randn(2, 15, 64, generator=g), encoder_hidden_states=torch.randn(2, 4, 32, generator=g),
                pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([0.3, 0.8]),
                img_ids=ids()[4:], txt_ids=torch.zeros(4, 3), guidance=torch.tensor([3.5, 2.0]), return_dict=False)
    with torch.no_grad():
        np.testing.assert_allclose(fused(**args)[0].numpy(), model(**args)[0].numpy(), rtol=1e-5, atol=1e-5)


def test_processor_refuses_attention_masks_by_name():
    from diffusers import FluxTransformer2DModel

    model = ort_fusions.make_fused(FluxTransformer2DModel(**TINY), torch.float32)
    attn = model.transformer_blocks[0].attn
    x = torch.randn(1, 3, 64)
    with pytest.raises(ExportError, match="mask.*--attention portable"), torch.no_grad():
        attn.processor(attn, x, attention_mask=torch.ones(1, 3, 3))


# ---- the adaptive LayerNorm rewrite on hand-built graphs --------------------------------------------

def modulated_ln(scale_shape, ones: bool = True, extra_use: bool = False) -> onnx.ModelProto:
    """y = LayerNormalization(x, w) * s + t, x [B, S, 8]."""
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", f, ["B", "S", 8]),
              helper.make_tensor_value_info("s", f, scale_shape), helper.make_tensor_value_info("t", f, scale_shape)]
    nodes = [helper.make_node("LayerNormalization", ["x", "w"], ["n"], axis=-1, epsilon=1e-6),
             helper.make_node("Mul", ["n", "s"], ["m"]), helper.make_node("Add", ["m", "t"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", f, ["B", "S", 8])]
    if extra_use:
        outputs.append(helper.make_tensor_value_info("n", f, ["B", "S", 8]))
    w = np.ones(8, np.float32) if ones else np.linspace(0.5, 1.5, 8).astype(np.float32)
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=[onnx.numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def rewrite(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    import onnx_ir as ir

    m = ir.serde.deserialize_model(model)
    counts = ort_fusions.fuse_graph(m)
    return ir.serde.serialize_model(m), counts


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_per_sample_modulation_becomes_one_layer_norm():
    model = modulated_ln(["B", 1, 8])
    fused, counts = rewrite(model)
    assert counts == {"adaptive_layer_norm": 1}
    assert [n.op_type for n in fused.graph.node] == ["LayerNormalization"]
    rng = np.random.default_rng(0)
    feed = dict(x=rng.standard_normal((3, 5, 8), np.float32), s=rng.standard_normal((3, 1, 8), np.float32),
                t=rng.standard_normal((3, 1, 8), np.float32))
    np.testing.assert_allclose(run(fused, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["per-token scale", "affine LayerNorm", "normalised output used elsewhere"])
def test_modulation_rewrite_leaves_other_patterns_alone(case):
    model = {"per-token scale": lambda: modulated_ln(["B", "S", 8]),
             "affine LayerNorm": lambda: modulated_ln(["B", 1, 8], ones=False),
             "normalised output used elsewhere": lambda: modulated_ln(["B", 1, 8], extra_use=True)}[case]()
    fused, counts = rewrite(model)
    assert counts == {"adaptive_layer_norm": 0}
    assert [n.op_type for n in fused.graph.node] == ["LayerNormalization", "Mul", "Add"]


# ---- the exported fused transformer ---------------------------------------------------------------

def test_fused_export_op_census(tmp_path):
    """One fused node per pattern: 4 RMS norms per double block and 2 per single one, 2 rotary
    embeddings and 1 attention per block, every LayerNorm modulated in place; none of the
    decomposed float32 arithmetic is left."""
    from diffusers import FluxTransformer2DModel

    from fluxrt.components import ModelDims, component_spec
    from fluxrt.export import onnx_export
    from fluxrt.export.graphs import TransformerGraph, translation_table

    dims = ModelDims("dev", clip_hidden_size=32, t5_d_model=32, joint_attention_dim=32, pooled_projection_dim=32)
    spec = component_spec("transformer", dims)
    torch.manual_seed(0)
    module = TransformerGraph(FluxTransformer2DModel(**TINY), guidance=True, rewrite="ort").eval()
    with torch.no_grad():
        program = torch.onnx.export(
            module, onnx_export.example_inputs(spec, dims, "fp32"), dynamo=True, opset_version=20,
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=onnx_export.dynamic_shapes(spec, dims), custom_translation_table=translation_table("ort"),
            verbose=False)
    assert ort_fusions.fuse_graph(program.model) == {"adaptive_layer_norm": 6}
    program.save(str(tmp_path / "t.onnx"))
    ops = collections.Counter((n.domain or "", n.op_type) for n in onnx.load(str(tmp_path / "t.onnx")).graph.node)
    assert ops[("", "SimplifiedLayerNormalization")] == 6
    assert ops[("com.microsoft", "RotaryEmbedding")] == 4
    assert ops[("com.microsoft", "MultiHeadAttention")] == 2
    assert ops[("", "LayerNormalization")] == 6
    for op in ("Softmax", "ReduceMean", "Pow", "Neg", "Reciprocal", "Transpose"):
        assert ops[("", op)] == 0, f"{op} left in the fused graph"
    layer_norms = [n for n in onnx.load(str(tmp_path / "t.onnx")).graph.node if n.op_type == "LayerNormalization"]
    assert all(len(n.input) == 3 for n in layer_norms)


# ---- the fused export through the whole toolkit -----------------------------------------------------

def test_fused_export_generates_the_portable_images_and_is_refused_by_the_engine_builder(
        tiny_checkpoints, fp32_exports, tmp_path):
    """``fluxrt export --attention ort`` (API path): the manifest records the fused graph and its
    rewrites, the runtime's images equal the portable export's, and TensorRT builds are refused
    before any work with the reason."""
    import json
    import shutil

    from fluxrt.components import ShapeEnvelope
    from fluxrt.engines.folder import BuildSettings, build_folder
    from fluxrt.errors import EngineError
    from fluxrt.export.checkpoint import Checkpoint
    from fluxrt.export.onnx_export import ExportRequest, export_checkpoint
    from fluxrt.runtime import FluxPipeline

    folder = tmp_path / "fused"
    shutil.copytree(fp32_exports["dev"], folder)
    export_checkpoint(Checkpoint.open(tiny_checkpoints["dev"]), folder,
                      ExportRequest(("transformer",), "fp32", attention="ort"))
    record = json.loads((folder / "manifest.json").read_text())["components"]["transformer"]
    assert record["attention"] == "ort" and record["graph_fusions"]["adaptive_layer_norm"] > 0
    args = dict(prompt=["a red fox in the snow", "a lighthouse"], height=48, width=80, num_inference_steps=3,
                max_sequence_length=24, output_type="np",
                latents=np.random.default_rng(0).standard_normal((2, 15, 64)).astype(np.float32))
    want = FluxPipeline.load(fp32_exports["dev"], backend="ort-cpu")(**args).images
    got = FluxPipeline.load(folder, backend="ort-cpu")(**args).images
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
    with pytest.raises(EngineError, match=r"\['transformer'\].*RotaryEmbedding.*--attention portable"):
        build_folder(folder, tmp_path / "engines", BuildSettings(precision="fp16", envelope=ShapeEnvelope()))
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").glob("*.plan"))
