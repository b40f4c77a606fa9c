"""fluxrt's ONNX Runtime kernels (runtime/ort_ops/fluxrt_ops.cu) and the transformer graph that
uses them (export/ort_kernels.py, ``--attention ort-kernels``): the torch reference ops against
diffusers' own functions, the compiled CPU kernels against the torch references through real
ONNX Runtime sessions, their error messages, the exported graph's op census and images, and on a
GPU the CUDA kernels (float32, float16, bfloat16) against the CPU ones."""

from __future__ import annotations

import collections
import copy
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from fluxrt.errors import EngineError, ExportError
from fluxrt.export import ort_kernels
from fluxrt.export.tiny import perturb
from fluxrt.runtime import ort_ops
from fluxrt.runtime.ort_ops import build as ort_build
from test_ort_fusions import TINY, ids

# 2 double + 3 single blocks: the single stack runs several blocks on the joined sequence
TINY_DEEP = dict(TINY, num_layers=2, num_single_layers=3)


def session(model: onnx.ModelProto, library, provider: str = "CPUExecutionProvider") -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    # CUDA: float32 matrix products in float32 (ONNX Runtime defaults to TF32), to compare with the CPU
    providers = ([provider] if provider == "CPUExecutionProvider"
                 else [(provider, {"use_tf32": "0"}), "CPUExecutionProvider"])
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)


ELEM = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def one_node(op: str, inputs: dict[str, np.ndarray | None], elem: int = TensorProto.FLOAT, **attrs) -> onnx.ModelProto:
    """A graph of one fluxrt node; None inputs are omitted (empty names)."""
    names = [n if v is not None else "" for n, v in inputs.items()]
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT if n in ("cos", "sin") else elem, None)
                    for n, v in inputs.items() if v is not None]
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node(op, names, ["y"], domain="fluxrt", **attrs)
    graph = helper.make_graph([node], op, graph_inputs, [helper.make_tensor_value_info("y", elem, None)])
    return helper.make_model(graph, ir_version=10,  # what ONNX Runtime 1.20+ reads
                             opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("fluxrt", 1)])


def rng_arrays(seed: int, **shapes) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {n: g.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def tables(L: int, D: int, seed: int = 9) -> tuple[np.ndarray, np.ndarray]:
    angles = np.random.default_rng(seed).uniform(-3, 3, (L, D // 2)).astype(np.float32)
    return np.cos(angles), np.sin(angles)


def norm_rope_inputs(B=2, L0=3, L1=5, H=2, D=32, joint=True, norm=True, rope=True, bias=True, seed=0):
    a = rng_arrays(seed, x0=(B, L0, H * D), b0=(H * D,), w0=(D,), x1=(B, L1, H * D), b1=(H * D,), w1=(D,))
    cos, sin = tables(L0 + (L1 if joint else 0), D)
    return dict(x0=a["x0"], bias0=a["b0"] if bias else None, weight0=a["w0"] if norm else None,
                x1=a["x1"] if joint else None, bias1=a["b1"] if joint and bias else None,
                weight1=a["w1"] if joint and norm else None, cos=cos if rope else None, sin=sin if rope else None)


def torch_ref(fn, inputs: dict, **attrs) -> np.ndarray:
    args = {n: (torch.from_numpy(v) if v is not None else None) for n, v in inputs.items()}
    return fn(**args, **attrs).numpy()


# ---- the torch reference ops against diffusers ------------------------------------------------------

def test_norm_rope_equals_diffusers_rms_norm_and_rotary():
    """Projection bias, RMSNorm (diffusers' module) and apply_rotary_emb (diffusers' function)
    on the text and image streams, joined text first: one NormRope."""
    from diffusers.models.embeddings import FluxPosEmbed, apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    pos = ids()  # 4 text + 15 image positions
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[4, 14, 14])(pos)
    half_cos, half_sin = ort_kernels.RotaryTables(10000, (4, 14, 14), torch.float32)(pos)
    g = torch.Generator().manual_seed(0)
    txt, img = torch.randn(2, 4, 64, generator=g), torch.randn(2, 15, 64, generator=g)
    b_txt, b_img = torch.randn(64, generator=g), torch.randn(64, generator=g)
    norms = [RMSNorm(32, eps=1e-6), RMSNorm(32, eps=1e-6)]
    with torch.no_grad():
        for n in norms:
            n.weight.copy_(torch.rand(32, generator=g) + 0.5)
        heads = [n((x + b).unflatten(-1, (2, 32))) for n, x, b in zip(norms, (txt, img), (b_txt, b_img))]
        want = apply_rotary_emb(torch.cat(heads, dim=1), (cos, sin), sequence_dim=1).flatten(2)
        got = ort_kernels.norm_rope(txt, b_txt, norms[0].weight, img, b_img, norms[1].weight, half_cos, half_sin,
                                    2, 1e-6)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=2e-5)


def test_ada_layer_norm_and_gated_residual_equal_diffusers_formulas():
    from diffusers.models.normalization import AdaLayerNormZeroSingle

    torch.manual_seed(0)
    norm = perturb(AdaLayerNormZeroSingle(64), torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    x, temb = torch.randn(2, 7, 64, generator=g) * 3 + 1, torch.randn(2, 64, generator=g)
    with torch.no_grad():
        want, gate = norm(x, emb=temb)
        shift, scale, gate2 = norm.linear(norm.silu(temb)).chunk(3, dim=1)
        got = ort_kernels.ada_layer_norm(x, scale, shift, norm.norm.eps)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    res, a, b = (torch.randn(2, 7, 64, generator=g) for _ in range(3))
    bias = torch.randn(64, generator=g)
    want = res + gate[:, None] * torch.nn.functional.linear(torch.cat([a, b], -1), torch.eye(64).repeat(1, 2), bias)
    got = ort_kernels.gated_residual(res, a, bias, gate, b, 0.0)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    assert float(ort_kernels.gated_residual(res, a * 1e5, None, gate * 0 + 1, None, 10.0).abs().max()) == 10.0


def test_bias_gelu_equals_diffusers_gelu_module():
    from diffusers.models.activations import GELU

    torch.manual_seed(0)
    act = perturb(GELU(24, 40, approximate="tanh"), torch.Generator().manual_seed(4))
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(5)) * 2
    with torch.no_grad():
        want = act(x)
        got = ort_kernels.bias_gelu(torch.nn.functional.linear(x, act.proj.weight), act.proj.bias)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def tiny_transformer(config=TINY_DEEP):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return perturb(FluxTransformer2DModel(**config), torch.Generator().manual_seed(0)).eval()


def transformer_args(seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 15, 64, generator=g), encoder_hidden_states=torch.randn(2, 4, 32, generator=g),
                pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([0.3, 0.8]),
                img_ids=ids()[4:], txt_ids=torch.zeros(4, 3), guidance=torch.tensor([3.5, 2.0]), return_dict=False)


def test_kernel_blocks_equal_diffusers_in_torch():
    """The rewritten transformer (custom ops on their torch references; split output projection,
    one single-block stack) against diffusers' FluxTransformer2DModel, fp32."""
    model = tiny_transformer()
    rewritten = ort_kernels.make_kernels(copy.deepcopy(model))
    assert len(rewritten.single_transformer_blocks) == 1
    with torch.no_grad():
        want, got = model(**transformer_args())[0], rewritten(**transformer_args())[0]
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_kernel_rewrite_refuses_what_it_cannot_compute():
    model = tiny_transformer()
    model.transformer_blocks[0].attn.norm_k = torch.nn.LayerNorm(32)
    with pytest.raises(ExportError, match="norm_k is LayerNorm, expected an nn.RMSNorm"):
        ort_kernels.make_kernels(model)
    model = tiny_transformer()
    model.single_transformer_blocks[1].act_mlp = torch.nn.GELU()
    with pytest.raises(ExportError, match=r"single block 1 act_mlp is GELU\(approximate='none'\).*tanh"):
        ort_kernels.make_kernels(model)
    rewritten = ort_kernels.make_kernels(tiny_transformer())
    with pytest.raises(ExportError, match=r"joint_attention_kwargs \['extra'\].*not supported"), torch.no_grad():
        rewritten(**transformer_args(), joint_attention_kwargs={"extra": 1})


# ---- the CPU kernels through ONNX Runtime, against the torch references ------------------------------

@pytest.mark.parametrize("case", [dict(), dict(joint=False), dict(norm=False, rope=False), dict(bias=False),
                                  dict(rope=False), dict(joint=False, norm=False)])
def test_norm_rope_kernel_equals_reference(ops_library, case):
    inputs = norm_rope_inputs(**case)
    got = session(one_node("NormRope", inputs, num_heads=2, epsilon=1e-6), ops_library).run(
        None, {n: v for n, v in inputs.items() if v is not None})[0]
    want = torch_ref(ort_kernels.norm_rope, inputs, num_heads=2, epsilon=1e-6)
    assert got.shape == want.shape == (2, 3 + (5 if case.get("joint", True) else 0), 64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def ada_inputs(B=2, L=5, C=48, per_sample_axis=False, seed=1):
    a = rng_arrays(seed, x=(B, L, C), scale=(B, 1, C) if per_sample_axis else (B, C), shift=(B, C))
    a["x"] = a["x"] * 4 + 2  # a mean far from 0: the variance must be taken about it
    return a


@pytest.mark.parametrize("per_sample_axis", [False, True])
def test_ada_layer_norm_kernel_equals_reference(ops_library, per_sample_axis):
    inputs = ada_inputs(per_sample_axis=per_sample_axis)
    got = session(one_node("AdaLayerNorm", inputs, epsilon=1e-6), ops_library).run(None, inputs)[0]
    ref = {**inputs, "scale": inputs["scale"].reshape(2, -1)}
    np.testing.assert_allclose(got, torch_ref(ort_kernels.ada_layer_norm, ref, epsilon=1e-6), rtol=1e-5, atol=1e-5)


def gated_inputs(B=2, L=5, C=48, bias=True, x2=True, seed=2):
    a = rng_arrays(seed, residual=(B, L, C), x=(B, L, C), bias=(C,), gate=(B, C), x2=(B, L, C))
    return dict(residual=a["residual"], x=a["x"], bias=a["bias"] if bias else None, gate=a["gate"],
                x2=a["x2"] if x2 else None)


@pytest.mark.parametrize("case", [dict(), dict(bias=False), dict(x2=False), dict(bias=False, x2=False)])
@pytest.mark.parametrize("clamp", [0.0, 1.5])
def test_gated_residual_kernel_equals_reference(ops_library, case, clamp):
    inputs = gated_inputs(**case)
    got = session(one_node("GatedResidual", inputs, clamp=clamp), ops_library).run(
        None, {n: v for n, v in inputs.items() if v is not None})[0]
    want = torch_ref(ort_kernels.gated_residual, inputs, clamp=clamp)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if clamp:
        assert np.abs(got).max() == pytest.approx(clamp)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("width", [48, 7])
def test_bias_gelu_kernel_equals_reference(ops_library, bias, width):
    a = rng_arrays(3, x=(2, 5, width), bias=(width,))
    inputs = dict(x=a["x"] * 3, bias=a["bias"] if bias else None)
    got = session(one_node("BiasGelu", inputs), ops_library).run(None, {n: v for n, v in inputs.items() if v is not None})[0]
    np.testing.assert_allclose(got, torch_ref(ort_kernels.bias_gelu, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op, inputs, attrs, message", [
    ("BiasGelu", dict(x=np.zeros((2, 3, 8), np.float32), bias=np.zeros(4, np.float32)), {},
     r"fluxrt.BiasGelu: bias must be \[8\], got \[4\]"),
    ("NormRope", dict(norm_rope_inputs(), x1=np.zeros((2, 5, 32), np.float32)), dict(num_heads=2),
     r"fluxrt.NormRope: x1 must be \[2, L1, 64\] like x0, got \[2, 5, 32\]"),
    ("NormRope", norm_rope_inputs(), dict(num_heads=3), "num_heads 3 must be positive and divide the width 64"),
    ("NormRope", dict(norm_rope_inputs(), cos=np.zeros((4, 16), np.float32)), dict(num_heads=2),
     r"cos and sin must be \[8, 16\], got \[4, 16\] and \[8, 16\]"),
    ("NormRope", dict(norm_rope_inputs(), weight1=None), dict(num_heads=2),
     "weight0 and weight1 must both be given or both be omitted"),
    ("AdaLayerNorm", dict(ada_inputs(), shift=np.zeros((3, 48), np.float32)), {},
     r"fluxrt.AdaLayerNorm: shift must be \[2, 48\] or \[2, 1, 48\], got \[3, 48\]"),
    ("AdaLayerNorm", ada_inputs(C=47), {}, "the last axis must have an even size, got 47"),
    ("GatedResidual", dict(gated_inputs(), x2=np.zeros((2, 4, 48), np.float32)), {},
     r"fluxrt.GatedResidual: x2 must have the residual's shape \[2, 5, 48\], got \[2, 4, 48\]"),
    ("GatedResidual", dict(gated_inputs(), bias=np.zeros(47, np.float32)), {}, r"bias must be \[48\], got \[47\]"),
])
def test_kernels_name_the_bad_input(ops_library, op, inputs, attrs, message):
    sess = session(one_node(op, inputs, **attrs), ops_library)
    with pytest.raises(Exception, match=message):
        sess.run(None, {n: v for n, v in inputs.items() if v is not None})


# ---- the library: build and lookup errors -------------------------------------------------------------

def test_missing_library_names_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setenv(ort_ops.ENV_LIBRARY, str(tmp_path / "nowhere.so"))
    with pytest.raises(EngineError, match=r"nowhere.so does not exist.*fluxrt ort-ops build"):
        ort_ops.library_path()
    monkeypatch.delenv(ort_ops.ENV_LIBRARY)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(EngineError, match=f"{tmp_path}/fluxrt/ort-ops-{ort_ops.source_digest()}"):
        ort_ops.library_path()


def test_cpu_only_library_refuses_cuda_and_non_libraries(ops_library, tmp_path):
    if ort_ops.library_devices(ops_library) == {"cpu"}:
        with pytest.raises(EngineError, match=r"built without cuda kernels \(it has \['cpu'\]\).*nvcc"):
            ort_ops.check_library(ops_library, "cuda")
    assert ort_ops.check_library(ops_library, "cpu") == ops_library
    (tmp_path / "x.so").write_bytes(b"not a library")
    with pytest.raises(EngineError, match="is not a fluxrt ONNX Runtime op library"):
        ort_ops.library_devices(tmp_path / "x.so")


def test_build_refuses_bad_architectures(tmp_path):
    with pytest.raises(EngineError, match=r"compute capabilities like '90', got \['sm_90'\]"):
        ort_build.build(tmp_path / "a.so", cuda=False, archs=("sm_90",))
    assert not (tmp_path / "a.so").exists()


def test_headers_from_a_named_folder(ops_library, monkeypatch, tmp_path):
    """--ort-include (or $FLUXRT_ORT_INCLUDE) wins over everything else, and must hold the header."""
    real = ort_build.ort_headers()
    with pytest.raises(EngineError, match=rf"--ort-include {tmp_path}: no onnxruntime_c_api.h there"):
        ort_build.ort_headers(tmp_path)
    monkeypatch.setenv(ort_build.ENV_INCLUDE, str(tmp_path / "none"))
    with pytest.raises(EngineError, match=r"\$FLUXRT_ORT_INCLUDE .*none: no onnxruntime_c_api.h"):
        ort_build.build(tmp_path / "b.so", cuda=False)
    shutil.copytree(real, tmp_path / "inc" / "onnxruntime")
    monkeypatch.setenv(ort_build.ENV_INCLUDE, str(tmp_path / "inc"))  # the include/ above onnxruntime/ works too
    assert ort_build.ort_headers() == tmp_path / "inc" / "onnxruntime"
    assert ort_build.build(tmp_path / "c.so", cuda=False) == tmp_path / "c.so"


def fake_apt(bin_dir: Path, deb: Path, listed_sha: str) -> None:
    """apt-get and apt-cache stand-ins: `download` hands out ``deb``, `show` lists ``listed_sha`` for it."""
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\n[ "$1" = download ] && cp {deb} . \n')
    (bin_dir / "apt-cache").write_text(
        f"#!/bin/sh\nprintf 'Package: libonnxruntime-dev\\nVersion: 9.9-1\\nArchitecture: all\\n"
        f"SHA256: {listed_sha}\\n'\n")
    for tool in ("apt-get", "apt-cache"):
        (bin_dir / tool).chmod(0o755)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian's package tools)")
def test_headers_from_the_package_client_are_hash_checked(ops_library, monkeypatch, tmp_path):
    """Without a named or installed folder, the headers come from `apt-get download`, whose package must
    have the SHA-256 apt's index lists for it; a mismatch is refused and nothing is unpacked or cached."""
    import hashlib
    import subprocess

    real = ort_build.ort_headers()
    tree = tmp_path / "pkg"
    shutil.copytree(real, tree / "usr" / "include" / "onnxruntime")
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN" / "control").write_text("Package: libonnxruntime-dev\nVersion: 9.9-1\nArchitecture: all\n"
                                             "Maintainer: fluxrt tests <t@example.org>\nDescription: test\n")
    deb = tmp_path / "libonnxruntime-dev_9.9-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True,
                   capture_output=True)
    monkeypatch.delenv(ort_build.ENV_INCLUDE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(ort_build, "installed_locations", lambda: [])
    fake_apt(tmp_path / "bad", deb, "0" * 64)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bad'}:{os.environ['PATH']}")
    with pytest.raises(EngineError, match=r"has SHA-256 [0-9a-f]{64}, but apt's index lists \['0{64}'\] for "
                                          r"libonnxruntime-dev 9.9-1 \(all\): refusing to build against it"):
        ort_build.build(tmp_path / "d.so", cuda=False)
    assert not (tmp_path / "d.so").exists() and not ort_build.headers_cache().exists()
    fake_apt(tmp_path / "good", deb, hashlib.sha256(deb.read_bytes()).hexdigest())
    monkeypatch.setenv("PATH", f"{tmp_path / 'good'}:{os.environ['PATH']}")
    assert ort_build.ort_headers() == ort_build.headers_cache()
    assert (ort_build.headers_cache() / "onnxruntime_c_api.h").read_bytes() == (real / "onnxruntime_c_api.h").read_bytes()


def missing_cuda_toolchain() -> str | None:
    """Why the CUDA kernels cannot be compiled here (no nvcc, or no cuBLASLt), or None."""
    if shutil.which("nvcc") is None:
        return "nvcc is not installed"
    try:
        ort_build.cublas_flags()
    except EngineError as e:
        return str(e)
    return None


def test_a_missing_cublas_is_named_with_where_it_was_looked_for(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setattr(ort_build, "toolkit_includes", lambda: [tmp_path / "include"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EngineError, match=r"cuBLASLt for the FP8 linears, and cublasLt.h is in neither the CUDA toolkit "
                                          r"\(.*include\) nor an installed nvidia-cublas wheel: .*--cpu-only"):
        ort_build.cublas_flags()
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cublasLt.h").write_text("")
    assert ort_build.cublas_flags() == ["-lcublasLt"]


@pytest.mark.skipif(missing_cuda_toolchain() is not None, reason=f"{missing_cuda_toolchain()}")
def test_cuda_build_compiles_every_kernel(tmp_path):
    path = ort_build.build(tmp_path / "lib.so", cuda=True, archs=("90",))
    assert ort_ops.library_devices(path) == {"cpu", "cuda"}
    # registers on a CPU-only ONNX Runtime too: the CUDA kernels are simply not chosen there
    session(one_node("AdaLayerNorm", ada_inputs(), epsilon=1e-6), path).run(None, ada_inputs())


# ---- the exported transformer -------------------------------------------------------------------------

def export_kernels_transformer(tmp_path, config=TINY_DEEP, precision="fp32"):
    from fluxrt.components import ModelDims, component_spec
    from fluxrt.export import onnx_export
    from fluxrt.export.graphs import TransformerGraph, translation_table

    dims = ModelDims("dev", clip_hidden_size=32, t5_d_model=32, joint_attention_dim=32, pooled_projection_dim=32)
    spec = component_spec("transformer", dims)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    module = TransformerGraph(tiny_transformer(config).to(dtype), guidance=True, rewrite="ort-kernels").eval()
    with torch.no_grad():
        program = torch.onnx.export(
            module, onnx_export.example_inputs(spec, dims, precision), dynamo=True, opset_version=20,
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=onnx_export.dynamic_shapes(spec, dims),
            custom_translation_table=translation_table("ort-kernels"), verbose=False)
    program.save(str(tmp_path / "t.onnx"))
    return tmp_path / "t.onnx"


def test_kernels_export_op_census_and_output(ops_library, deep_kernels_transformer):
    """Per double block 3 NormRope (q, k, v), 4 AdaLayerNorm, 4 GatedResidual, 2 BiasGelu; per
    single block 2, 1, 1, 1; no RotaryEmbedding, FastGelu, RMS norm or stock LayerNorm left but the output norm; no
    concatenation as wide as the single blocks' cat(attention, mlp); the graph's output on ONNX
    Runtime equals diffusers'."""
    path = deep_kernels_transformer
    model = onnx.load(str(path))
    ops = collections.Counter((n.domain or "", n.op_type) for n in model.graph.node)
    assert ops[("fluxrt", "NormRope")] == 2 * 3 + 3 * 2
    assert ops[("fluxrt", "AdaLayerNorm")] == 2 * 4 + 3 * 1
    assert ops[("fluxrt", "GatedResidual")] == 2 * 4 + 3 * 1
    assert ops[("fluxrt", "BiasGelu")] == 2 * 2 + 3 * 1
    assert ops[("", "Gelu")] == 0
    assert ops[("com.microsoft", "MultiHeadAttention")] == 5
    for gone in [("com.microsoft", "RotaryEmbedding"), ("", "SimplifiedLayerNormalization"), ("", "Softmax")]:
        assert ops[gone] == 0
    assert ops[("", "LayerNormalization")] == 1  # norm_out, AdaLayerNormContinuous
    assert ops[("", "Concat")] <= 8  # shape arithmetic and the rotary tables; no per-block joins
    sess = session(model, ops_library)
    args = transformer_args()
    feed = {k: args[k].numpy() for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                                         "img_ids", "txt_ids", "guidance")}
    got = sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})[0]
    with torch.no_grad():
        want = tiny_transformer()(**args)[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_kernels_export_through_the_toolkit(ops_library, kernels_dev, fp32_exports, tmp_path, monkeypatch):
    """``fluxrt export --attention ort-kernels`` (API path): the runtime registers the library and
    makes the portable export's images; without the library it names the build command; TensorRT
    builds are refused."""
    import json

    from fluxrt.components import ShapeEnvelope
    from fluxrt.engines.folder import BuildSettings, build_folder
    from fluxrt.runtime import FluxPipeline

    folder = kernels_dev  # the fp32 export with its transformer re-exported --attention ort-kernels
    assert json.loads((folder / "manifest.json").read_text())["components"]["transformer"]["attention"] == "ort-kernels"
    args = dict(prompt=["a red fox in the snow", "a lighthouse"], height=48, width=80, num_inference_steps=3,
                max_sequence_length=24, output_type="np",
                latents=np.random.default_rng(0).standard_normal((2, 15, 64)).astype(np.float32))
    want = FluxPipeline.load(fp32_exports["dev"], backend="ort-cpu")(**args).images
    monkeypatch.setenv(ort_ops.ENV_LIBRARY, str(ops_library))
    got = FluxPipeline.load(folder, backend="ort-cpu")(**args).images
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
    monkeypatch.setenv(ort_ops.ENV_LIBRARY, str(tmp_path / "missing.so"))
    with pytest.raises(EngineError, match="missing.so does not exist.*fluxrt ort-ops build"):
        FluxPipeline.load(folder, backend="ort-cpu")(**args)
    with pytest.raises(EngineError, match=r"\['transformer'\].*--attention portable"):
        build_folder(folder, tmp_path / "engines", BuildSettings(precision="fp16", envelope=ShapeEnvelope()))


# ---- on a GPU: the CUDA kernels against the CPU ones ----------------------------------------------

def require_cuda_library(library):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider")
    if "cuda" not in ort_ops.library_devices(library):
        pytest.skip(f"{library} has no CUDA kernels (set {ort_ops.ENV_LIBRARY} to a CUDA build)")
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def cast_graph(model: onnx.ModelProto, elem: int) -> onnx.ModelProto:
    """The one-node graph in ``elem``: float inputs cast in, the output cast back to float32 (cos
    and sin stay float32, as the op wants them)."""
    graph = model.graph
    node = graph.node[0]
    nodes, inputs = [], []
    for vi in graph.input:
        if vi.name in ("cos", "sin"):
            inputs.append(vi)
            continue
        inputs.append(helper.make_tensor_value_info(vi.name, TensorProto.FLOAT, None))
        nodes.append(helper.make_node("Cast", [vi.name], [vi.name + "_c"], to=elem))
    renamed = [n + "_c" if n and n not in ("cos", "sin") else n for n in node.input]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    nodes.append(helper.make_node(node.op_type, renamed, ["y_c"], domain="fluxrt", **attrs))
    nodes.append(helper.make_node("Cast", ["y_c"], ["y"], to=TensorProto.FLOAT))
    out = helper.make_graph(nodes, "cast", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(out, ir_version=10, opset_imports=list(model.opset_import))


GPU_CASES = [
    ("NormRope", lambda: norm_rope_inputs(B=2, L0=7, L1=33, H=3, D=128), dict(num_heads=3, epsilon=1e-6)),
    ("NormRope", lambda: norm_rope_inputs(B=1, L0=9, H=4, D=16, joint=False), dict(num_heads=4, epsilon=1e-6)),
    ("NormRope", lambda: norm_rope_inputs(B=2, L0=5, L1=6, H=3, D=128, norm=False, rope=False), dict(num_heads=3)),
    ("AdaLayerNorm", lambda: ada_inputs(B=2, L=37, C=3072), dict(epsilon=1e-6)),
    ("AdaLayerNorm", lambda: ada_inputs(B=1, L=3, C=50, per_sample_axis=True), dict(epsilon=1e-6)),
    ("GatedResidual", lambda: gated_inputs(B=2, L=37, C=3072), dict(clamp=0.0)),
    ("GatedResidual", lambda: gated_inputs(B=1, L=3, C=50, bias=False), dict(clamp=2.0)),
    ("BiasGelu", lambda: dict(rng_arrays(6, x=(2, 37, 1536), bias=(1536,))), {}),
    ("BiasGelu", lambda: dict(x=rng_arrays(7, x=(3, 5, 7))["x"], bias=None), {}),
]
TOL = {TensorProto.FLOAT: 2e-5, TensorProto.FLOAT16: 4e-3, TensorProto.BFLOAT16: 3e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("elem", [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("op, make, attrs", GPU_CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(GPU_CASES)])
def test_cuda_kernels_equal_cpu_kernels(ops_library, op, make, attrs, elem):
    """Inputs rounded to the dtype first on both sides; the error left is the output's rounding."""
    require_cuda_library(ops_library)
    inputs = make()
    feed = {n: v for n, v in inputs.items() if v is not None}
    rounded = {n: (torch.from_numpy(v).to({TensorProto.FLOAT16: torch.float16, TensorProto.BFLOAT16: torch.bfloat16}
                                          .get(elem, torch.float32)).float().numpy() if n not in ("cos", "sin") else v)
               for n, v in feed.items()}
    want = session(one_node(op, inputs, **attrs), ops_library).run(None, rounded)[0]
    gpu = session(cast_graph(one_node(op, inputs, **attrs), elem), ops_library, "CUDAExecutionProvider")
    got = gpu.run(None, feed)[0]
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=TOL[elem], atol=TOL[elem] * scale)


@pytest.mark.gpu
def test_cuda_kernels_transformer_equals_cpu_and_replays_in_a_cuda_graph(ops_library, deep_kernels_transformer):
    require_cuda_library(ops_library)
    path = deep_kernels_transformer
    args = transformer_args()
    feed = {k: args[k].numpy() for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                                         "img_ids", "txt_ids", "guidance")}
    model = onnx.load(str(path))
    cpu = session(model, ops_library)
    feed = {i.name: feed[i.name] for i in cpu.get_inputs()}
    want = cpu.run(None, feed)[0]
    gpu = session(model, ops_library, "CUDAExecutionProvider")
    assert "CUDAExecutionProvider" in gpu.get_providers()
    np.testing.assert_allclose(gpu.run(None, feed)[0], want, rtol=2e-4, atol=2e-4)

    import cupy

    from fluxrt.components import ModelDims, component_spec
    from fluxrt.runtime.ort import OrtRunner

    dims = ModelDims("dev", clip_hidden_size=32, t5_d_model=32, joint_attention_dim=32, pooled_projection_dim=32)
    runner = OrtRunner(component_spec("transformer", dims), "fp32", path, backend="ort-cuda", cuda_graph=True,
                       custom_ops=ops_library).activate()
    device_feed = {k: cupy.asarray(v) for k, v in feed.items()}
    first = cupy.asnumpy(runner.infer(device_feed)["latent"])
    again = cupy.asnumpy(runner.infer(device_feed)["latent"])  # replayed
    np.testing.assert_allclose(first, want, rtol=5e-3, atol=5e-3)  # the runner's session: TF32 products
    np.testing.assert_array_equal(again, first)


def test_cli_builds_the_library_and_reports_bad_arguments(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "lib" / ort_ops.LIBRARY_NAME
    r = subprocess.run([sys.executable, "-m", "fluxrt.cli", "ort-ops", "build", "--cpu-only", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"(cpu) to {out}" in r.stdout and f"{ort_ops.ENV_LIBRARY}={out}" in r.stdout
    assert ort_ops.library_devices(out) == {"cpu"}
    assert not list(out.parent.glob(".*tmp*"))  # nothing half-written left beside it
    r = subprocess.run([sys.executable, "-m", "fluxrt.cli", "ort-ops", "build", "--cuda-archs", "sm_90", "--out",
                        str(tmp_path / "x.so")], capture_output=True, text=True)
    assert r.returncode != 0 and "compute capabilities like '90', got ['sm_90']" in r.stderr
    assert not (tmp_path / "x.so").exists()
