"""FP8 post-training quantization (engines/fp8.py) on the tiny dev export.

Calibration samples come from the runtime's sampling loop; ModelOpt's Q/DQ graph is checked
against the full-precision graph on held-out inputs (with a negative control), its scales
against an amax computed here independently, its Q/DQ placement by module path, its build with
TensorRT-RTX, and the error messages.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fluxrt.artifacts import ExportFolder
from fluxrt.engines import fp8
from fluxrt.engines.fp8 import Fp8Settings, bundled_prompts, calibrate_fp8, capture_feeds
from fluxrt.errors import EngineError
from fluxrt.runtime.ort import OrtRunner
from fluxrt.runtime.pipeline import FluxPipeline

CALIBRATION = Fp8Settings(num_prompts=4, num_inference_steps=3, height=64, width=64, max_sequence_length=16, seed=0)
HELD_OUT_PROMPTS = ["a blue bicycle leaning against a brick wall", "portrait of a cat wearing a crown, oil painting",
                    "sunset over a frozen lake"]
HELD_OUT = Fp8Settings(num_prompts=3, num_inference_steps=3, height=64, width=64, max_sequence_length=16, seed=1000)
# Relative RMS error of the FP8 transformer's velocity against the fp32 graph's on held-out inputs.
# Measured 1.4% on the tiny dev model; scales 100x too small (saturation) give ~26%.
TRANSFORMER_BOUND = 0.03
# T5's output (tiny model, width 32, nothing left in fp32 at the end): measured 6.8%.
T5_BOUND = 0.10
FP8 = onnx.TensorProto.FLOAT8E4M3FN


def block_linears(double: int, single: int) -> set[str]:
    """Module paths of the linears FLUX's blocks have (diffusers' names), written out here
    rather than taken from fp8.RULES."""
    out = set()
    for i in range(double):
        for name in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                     "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2"):
            out.add(f"model.transformer_blocks.{i}.{name}")
    for i in range(single):
        for name in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"):
            out.add(f"model.single_transformer_blocks.{i}.{name}")
    return out


UNQUANTIZED = {  # embedders, AdaLN modulation and the final projection keep fp32
    "model.x_embedder", "model.context_embedder", "model.proj_out", "model.norm_out.linear",
    "model.time_text_embed.timestep_embedder.linear_1", "model.time_text_embed.timestep_embedder.linear_2",
    "model.time_text_embed.guidance_embedder.linear_1", "model.time_text_embed.guidance_embedder.linear_2",
    "model.time_text_embed.text_embedder.linear_1", "model.time_text_embed.text_embedder.linear_2",
    "model.transformer_blocks.0.norm1.linear", "model.transformer_blocks.0.norm1_context.linear",
    "model.single_transformer_blocks.1.norm.linear",
}


@pytest.fixture(scope="module")
def dev(fp32_exports):
    return fp32_exports["dev"]


@pytest.fixture(scope="module")
def quantized(dev, tmp_path_factory):
    """(path, record) of the tiny dev transformer calibrated on 4 bundled prompts x 3 steps."""
    out = tmp_path_factory.mktemp("fp8") / "transformer_fp8.onnx"
    return out, calibrate_fp8(dev, out, settings=CALIBRATION)


def run_graph(export_dir, component: str, path, feeds: list[dict]) -> np.ndarray:
    """Outputs of ``path`` run as ``component`` by the runtime's own ONNX Runtime runner, which
    checks each feed against the component's tensor spec."""
    folder = ExportFolder.open(export_dir)
    runner = OrtRunner(folder.spec(component), folder.graph_precision(component), path).activate()
    name = folder.spec(component).output_names[0]
    return np.stack([runner.infer(f)[name] for f in feeds]).astype(np.float32)


def relative_rms(reference: np.ndarray, x: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x - reference) ** 2) / np.mean(reference**2)))


def scaled_copy(path, out, factor: float):
    """The FP8 graph with every Q/DQ scale multiplied by ``factor``."""
    model = onnx.load(str(path))
    scales = {n.input[1] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    for t in model.graph.initializer:
        if t.name in scales:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * np.float32(factor), t.name))
    onnx.save(model, str(out))
    return out


# ---------------------------------------------------------------- fidelity

def test_fp8_transformer_stays_close_on_held_out_inputs(quantized, dev, tmp_path):
    path, record = quantized
    assert not set(HELD_OUT_PROMPTS) & set(record["prompts"] + bundled_prompts())
    feeds = capture_feeds(dev, HELD_OUT_PROMPTS, HELD_OUT)
    assert len(feeds) == 3 * 3
    reference = run_graph(dev, "transformer", dev / "transformer.onnx", feeds)  # [9, B, N, 64]
    err = relative_rms(reference, run_graph(dev, "transformer", path, feeds))
    assert 0.002 < err < TRANSFORMER_BOUND, err  # above zero: the graph really rounds to FP8
    # negative control: scales 100x too small saturate at +-448 and must break the bound
    wrong = relative_rms(reference, run_graph(dev, "transformer", scaled_copy(path, tmp_path / "w.onnx", 0.01), feeds))
    assert wrong > 3 * TRANSFORMER_BOUND, wrong


def test_pipeline_with_the_fp8_transformer_makes_nearly_the_same_images(quantized, dev):
    """End to end, batch 2: the FP8 graph drops into the runtime as the transformer.
    Measured on the tiny model: mean |difference| 0.001, max 0.01 (pixels in [0, 1])."""
    path, _ = quantized
    pipe = FluxPipeline.load(dev)
    kwargs = dict(height=64, width=64, num_inference_steps=3, max_sequence_length=16, seed=1000, output_type="np")
    reference = pipe(HELD_OUT_PROMPTS[:2], **kwargs).images  # [2, 64, 64, 3]
    pipe.runners["transformer"] = OrtRunner(pipe.folder.spec("transformer"), "fp32", path).activate()
    images = pipe(HELD_OUT_PROMPTS[:2], **kwargs).images
    diff = np.abs(images - reference)
    assert 0 < diff.mean() < 0.005 and diff.max() < 0.05, (diff.mean(), diff.max())


def test_scales_are_amax_of_the_calibration_samples(quantized, dev, tmp_path):
    """FP8 E4M3 spans 2**-9..448, so scales 100x too large barely change the output; check each
    scale against max |x| / 448 instead, with amax computed here from re-captured samples."""
    path, record = quantized
    feeds = capture_feeds(dev, record["prompts"], CALIBRATION)
    assert len(feeds) == record["num_samples"] == 4 * 3
    # the recorder copies what changes per step and shares what does not
    assert feeds[0]["encoder_hidden_states"] is feeds[1]["encoder_hidden_states"]
    assert feeds[0]["hidden_states"] is not feeds[1]["hidden_states"]
    sigmas = [float(f["timestep"][0]) for f in feeds[:3]]  # one prompt's steps
    assert sigmas == sorted(sigmas, reverse=True) and len(set(sigmas)) == 3
    model = onnx.load(str(path))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    q_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    activations = sorted({n.input[0] for n in q_nodes if n.input[0] not in weights})
    assert activations

    source = onnx.load(str(ExportFolder.open(dev).graph_path("transformer")))
    source.graph.output.extend(onnx.helper.make_tensor_value_info(a, onnx.TensorProto.FLOAT, None) for a in activations)
    probe = tmp_path / "probe.onnx"
    onnx.save(source, str(probe))
    session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    amax = np.zeros(len(activations))
    for f in feeds:
        outs = session.run(activations, f)
        amax = np.maximum(amax, [np.abs(o).max() for o in outs])

    for n in q_nodes:
        scale = weights[n.input[1]] * 448
        if n.input[0] in weights:  # per output channel of a [K, N] weight
            axis = next(a.i for a in n.attribute if a.name == "axis")
            w = np.abs(weights[n.input[0]])
            want = w.max(axis=tuple(i for i in range(w.ndim) if i != axis))
        else:
            want = amax[activations.index(n.input[0])]
        np.testing.assert_allclose(scale, want, rtol=1e-4, err_msg=n.name)


# ---------------------------------------------------------------- graph

def q_dq_inputs(model) -> dict[str, bool]:
    """MatMul/Gemm node name -> whether both its inputs come out of DequantizeLinear."""
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    return {n.name: all(made_by.get(i) == "DequantizeLinear" for i in n.input[:2])
            for n in model.graph.node if n.op_type in ("MatMul", "Gemm")}


def test_qdq_on_block_linears_only_same_io(quantized, dev):
    path, record = quantized
    model = onnx.load(str(path))
    source = onnx.load(str(ExportFolder.open(dev).graph_path("transformer")))
    qdq = q_dq_inputs(model)
    blocks = block_linears(double=2, single=2)
    assert {name for name, q in qdq.items() if q} == blocks == set(record["quantized"])
    assert UNQUANTIZED <= {name for name, q in qdq.items() if not q}  # named by module, left in fp32
    assert UNQUANTIZED <= set(record["excluded"])
    assert sum(1 for n in source.graph.node if n.op_type in ("MatMul", "Gemm")) == len(qdq)

    initializers = {t.name: t for t in model.graph.initializer}
    qdq_nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    # activations: a QuantizeLinear/DequantizeLinear pair each; weights: stored in E4M3, read by DequantizeLinear
    stored = [n for n in qdq_nodes if n.op_type == "DequantizeLinear" and n.input[0] in initializers]
    assert len(stored) == len(record["quantized"]) == record["quantization"]["stored_fp8_weights"]
    assert all(initializers[n.input[0]].data_type == FP8 and len(initializers[n.input[0]].dims) == 2 for n in stored)
    assert len(qdq_nodes) == len(stored) + 2 * len({n.input[0] for n in qdq_nodes if n.op_type == "QuantizeLinear"})
    for n in qdq_nodes:
        assert initializers[n.input[2]].data_type == FP8, n.name  # zero point: FLOAT8E4M3FN
        assert all(a.i == 1 for a in n.attribute if a.name == "saturate"), n.name
    assert {o.domain: o.version for o in model.opset_import}[""] >= 19

    def io(m):
        return [(v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim))
                for v in list(m.graph.input) + list(m.graph.output)]

    assert io(model) == io(source)


def test_stored_fp8_weights_equal_torchs_e4m3_rounding(quantized, dev):
    """Each stored weight, dequantized, is the source weight quantized by torch's own float8_e4m3fn cast
    (per output channel, saturating at 448): the graph means what its Q/DQ pair meant."""
    import torch
    from onnx import numpy_helper

    path, record = quantized
    source = onnx.load(str(ExportFolder.open(dev).graph_path("transformer")))
    model = onnx.load(str(path))
    linears = fp8.find_linears(source, "source")
    src_init = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer}
    q_init = {t.name: t for t in model.graph.initializer}
    made_by = {o: n for n in model.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}
    checked = 0
    for node_name, module in linears.items():
        if module not in record["quantized"]:
            continue
        dq = made_by[nodes[module].input[1]]
        w = torch.from_numpy(src_init[next(n for n in source.graph.node if n.name == node_name).input[1]].copy())
        scale = torch.from_numpy(numpy_helper.to_array(q_init[dq.input[1]]).astype(np.float32))
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        s = scale.reshape([-1 if d == axis else 1 for d in range(w.ndim)])
        want = (w.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
        got = numpy_helper.to_array(q_init[dq.input[0]]).astype(np.float32) * s.numpy()
        np.testing.assert_array_equal(got, want.numpy(), err_msg=module)
        checked += 1
    assert checked == len(record["quantized"])


def test_record_sidecar_and_untouched_export(quantized, dev):
    path, record = quantized
    record_file = path.with_suffix(".json")
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, record_file.name])  # no staging left
    assert json.loads(record_file.read_text()) == record
    folder = ExportFolder.open(dev)
    source = folder.verified_graph("transformer")  # ModelOpt rewrites the graph it is given in place: it got a copy
    assert record["source"]["fingerprint"] == folder.record("transformer")["fingerprint"]["sha256"]
    # the derived graph's own fingerprint, of every file it consists of
    assert record["fingerprint"]["files"] == {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    assert record["source"]["file"] == source.name
    assert record["settings"] == dict(num_prompts=4, num_inference_steps=3, height=64, width=64,
                                      max_sequence_length=16, guidance_scale=3.5, seed=0, backend="ort-cpu",
                                      fp8_attention=False, fused_products=True, fast_accumulation=False)
    assert record["prompts"] == bundled_prompts()[:4] and record["num_samples"] == 12
    assert record["library"]["name"] == "nvidia-modelopt" and record["library"]["version"]
    assert record["data_file"] is None and record["component"] == "transformer"
    assert record["calibration"]["num_prompts"] == 4 and record["calibration"]["num_inference_steps"] == 3
    assert record["seconds"]["total"] >= record["seconds"]["capture"] > 0


def test_large_graphs_are_written_with_external_data(quantized, tmp_path, monkeypatch):
    path, _ = quantized
    monkeypatch.setattr(fp8, "EXTERNAL_DATA_BYTES", 1024)
    out = tmp_path / "big.onnx"
    staging = tmp_path / "staging"
    staging.mkdir()
    assert fp8.write_graph(onnx.load(str(path)), out, staging) == "big.onnx.data"
    assert (tmp_path / "big.onnx.data").stat().st_size > out.stat().st_size
    assert not list((staging / "final").iterdir())
    model = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_t5_quantizes_attention_and_gated_mlp_inputs(dev, tmp_path):
    out = tmp_path / "t5_fp8.onnx"
    record = calibrate_fp8(dev, out, component="t5", settings=Fp8Settings(num_prompts=8, max_sequence_length=16))
    assert record["num_samples"] == 8
    want = {f"model.encoder.block.{b}.layer.{name}" for b in range(2)
            for name in ("0.SelfAttention.q", "0.SelfAttention.k", "0.SelfAttention.v", "0.SelfAttention.o",
                         "1.DenseReluDense.wi_0", "1.DenseReluDense.wi_1")}
    qdq = q_dq_inputs(onnx.load(str(out)))
    assert {name for name, q in qdq.items() if q} == want == set(record["quantized"])
    assert not qdq["model.encoder.block.0.layer.1.DenseReluDense.wo"]
    feeds = capture_feeds(dev, HELD_OUT_PROMPTS, Fp8Settings(num_prompts=3, max_sequence_length=16), "t5")
    err = relative_rms(run_graph(dev, "t5", dev / "t5.onnx", feeds), run_graph(dev, "t5", out, feeds))
    assert 0.002 < err < T5_BOUND, err


# ---------------------------------------------------------------- TensorRT-RTX

@pytest.fixture(scope="module")
def trt_rtx():
    from fluxrt.trt import import_trt

    try:
        return import_trt("tensorrt-rtx")
    except EngineError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("target", ["SM89", "SM120"])
def test_trt_rtx_builds_the_fp8_graph(quantized, dev, trt_rtx, target, tmp_path):
    from fluxrt.components import ShapeEnvelope
    from fluxrt.engines.build import build_engine

    path, _ = quantized
    folder = ExportFolder.open(dev)
    spec = folder.spec("transformer")
    envelope = ShapeEnvelope(batch=(1, 1, 2), text_length=(1, 16, 32), image_side=(32, 64, 128))
    plan = tmp_path / "transformer_fp8.plan"
    record = build_engine(path, spec, folder.dims, envelope, plan, trt_module=trt_rtx,
                          compute_capabilities=[target], progress=False)
    assert plan.stat().st_size == record["plan_bytes"] > 0
    assert record["compute_capabilities"] == [target] and record["precision"] == "fp32"
    assert [t["name"] for t in record["io"]["inputs"]] == spec.input_names
    assert record["io"]["inputs"][0]["profile"] == [[1, 4, 64], [1, 16, 64], [2, 64, 64]]

    # the parsed network carries the Q/DQ pairs as FP8 quantize layers (fused into FP8 GEMMs at build)
    trt = trt_rtx
    network = trt.Builder(trt.Logger(trt.Logger.ERROR)).create_network(
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert trt.OnnxParser(network, trt.Logger(trt.Logger.ERROR)).parse_from_file(str(path))
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    quantize = [la for la in layers if la.type == trt.LayerType.QUANTIZE]
    assert quantize and all(la.get_output(0).dtype == trt.DataType.FP8 for la in quantize)
    n_q = sum(1 for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "QuantizeLinear")
    assert len(quantize) == n_q


# ---------------------------------------------------------------- prompts, settings, errors

def test_bundled_prompts():
    prompts = bundled_prompts()
    assert len(prompts) >= 64 and len(set(prompts)) == len(prompts)
    words = [len(p.split()) for p in prompts]
    assert min(words) >= 3 and max(words) >= 60
    assert sum(1 for p in prompts if '"' in p) >= 5  # text rendering


def test_settings_defaults_resolve_per_variant():
    s = Fp8Settings()
    assert (s.num_prompts, s.height, s.width, s.seed, s.backend) == (64, 1024, 1024, 0, "ort-cpu")
    dev = s.resolve("dev")
    assert (dev["num_inference_steps"], dev["max_sequence_length"], dev["guidance_scale"]) == (28, 512, 3.5)
    schnell = s.resolve("schnell")
    assert (schnell["num_inference_steps"], schnell["max_sequence_length"], schnell["guidance_scale"]) == (4, 256, None)
    with pytest.raises(ValueError, match=r"guidance_scale 2.0: FLUX.1-schnell has no guidance input"):
        Fp8Settings(guidance_scale=2.0).resolve("schnell")


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_prompts=0), r"Fp8Settings.num_prompts must be a positive integer, got 0"),
    (dict(num_inference_steps=2.5), r"num_inference_steps must be a positive integer or None, got 2.5"),
    (dict(height=1000), r"Fp8Settings.height must be a multiple of 16 pixels, got 1000"),
    (dict(width=True), r"Fp8Settings.width must be a positive integer, got True"),
    (dict(seed=-1), r"Fp8Settings.seed must be a non-negative integer, got -1"),
    (dict(guidance_scale=float("nan")), r"guidance_scale must be a finite number or None, got nan"),
    (dict(backend="trt"), r"Fp8Settings.backend 'trt' is not one of \['ort-cpu', 'ort-cuda'\]"),
])
def test_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Fp8Settings(**kwargs)


def test_missing_export_folder(tmp_path):
    with pytest.raises(EngineError, match=r"FP8 calibration of transformer: export folder .*nowhere does not exist"):
        calibrate_fp8(tmp_path / "nowhere", tmp_path / "t.onnx", settings=CALIBRATION)


def test_missing_transformer_graph(dev, tmp_path):
    broken = tmp_path / "export"
    shutil.copytree(dev, broken)
    (broken / "transformer.onnx").unlink()
    with pytest.raises(EngineError, match=r"FP8 calibration of transformer: transformer graph .*transformer.onnx "
                                          r"listed in the manifest is missing"):
        calibrate_fp8(broken, tmp_path / "t.onnx", settings=CALIBRATION)
    manifest = json.loads((broken / "manifest.json").read_text())
    del manifest["components"]["transformer"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=r"export folder .* has no transformer graph; it has \['clip', 't5', "
                                          r"'vae_decoder', 'vae_encoder'\]"):
        calibrate_fp8(broken, tmp_path / "t.onnx", settings=CALIBRATION)
    assert not (tmp_path / "t.onnx").exists()


def test_bad_arguments(dev, tmp_path):
    with pytest.raises(ValueError, match=r"component 'vae_decoder' is not supported; supported components are "
                                         r"\['transformer', 't5'\]"):
        calibrate_fp8(dev, tmp_path / "v.onnx", component="vae_decoder")
    with pytest.raises(ValueError, match=r"Fp8Settings.num_prompts is 500, but the bundled prompts hold only \d+"):
        calibrate_fp8(dev, tmp_path / "t.onnx", settings=Fp8Settings(num_prompts=500))
    with pytest.raises(ValueError, match=r"num_prompts is 4, but the given prompts hold only 1"):
        calibrate_fp8(dev, tmp_path / "t.onnx", prompts=["a cat"], settings=CALIBRATION)
    with pytest.raises(EngineError, match=r"output folder .*missing does not exist"):
        calibrate_fp8(dev, tmp_path / "missing" / "t.onnx", settings=CALIBRATION)
    with pytest.raises(EngineError, match=r"the output .*transformer.onnx is the source graph itself"):
        calibrate_fp8(dev, dev / "transformer.onnx", settings=CALIBRATION)
    assert not list(tmp_path.iterdir())


def test_graph_without_module_scopes_is_refused(dev):
    model = onnx.load(str(ExportFolder.open(dev).graph_path("transformer")), load_external_data=False)
    for node in model.graph.node:
        del node.metadata_props[:]
    with pytest.raises(EngineError, match=re.escape("no MatMul/Gemm node carries torch.onnx's module-scope metadata")):
        fp8.find_linears(model, "transformer.onnx")
