"""Exported graphs equal the torch models: ONNX Runtime (CPU) against the checkpoint's own
torch modules, at two or more sizes of every dynamic axis."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from fluxrt.components import component_spec
from fluxrt.errors import ExportError
from fluxrt.export.checkpoint import Checkpoint
from fluxrt.export.onnx_export import ExportRequest, export_checkpoint
from fluxrt.export.weights import TORCH_DTYPES

VARIANTS = ("dev", "schnell")
# (batch, text length, image height px, image width px): both sizes differ on every axis, one non-square
SHAPES = [(1, 5, 64, 64), (3, 12, 48, 80)]
FP32_TOL = dict(rtol=1e-4, atol=1e-4)  # fp32 graph vs fp32 eager: reordering of sums only


def rand(shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def feeds(component: str, dims, batch: int, text: int, height: int, width: int, seed: int = 0) -> dict:
    h, w = height // dims.vae_scale_factor, width // dims.vae_scale_factor
    n = (h // 2) * (w // 2)
    rng = np.random.default_rng(seed)
    if component == "clip":
        return {"input_ids": rng.integers(0, 150, (batch, dims.clip_max_length)).astype(np.int32)}
    if component == "t5":
        return {"input_ids": rng.integers(0, 150, (batch, text)).astype(np.int32)}
    if component == "vae_decoder":
        return {"latent": rand((batch, dims.latent_channels, h, w), seed)}
    if component == "vae_encoder":
        return {"images": np.tanh(rand((batch, 3, height, width), seed))}
    ids = np.zeros((h // 2, w // 2, 3), np.float32)
    ids[..., 1] += np.arange(h // 2)[:, None]
    ids[..., 2] += np.arange(w // 2)[None, :]
    feed = {
        "hidden_states": rand((batch, n, dims.in_channels), seed),
        "encoder_hidden_states": rand((batch, text, dims.joint_attention_dim), seed + 1),
        "pooled_projections": rand((batch, dims.pooled_projection_dim), seed + 2),
        "timestep": rng.uniform(0, 1, batch).astype(np.float32),
        "img_ids": ids.reshape(-1, 3),
        "txt_ids": np.zeros((text, 3), np.float32),
    }
    if dims.guidance:
        feed["guidance"] = rng.uniform(1, 5, batch).astype(np.float32)
    return feed


def torch_reference(ckpt: Checkpoint, component: str, feed: dict) -> list[np.ndarray]:
    """The checkpoint's unmodified diffusers/transformers modules, called the way diffusers' FluxPipeline calls them."""
    t = {k: torch.from_numpy(v) for k, v in feed.items()}
    with torch.no_grad():
        if component == "clip":
            out = ckpt.load_clip(torch.float32)(input_ids=t["input_ids"].long())
            return [out.last_hidden_state.numpy(), out.pooler_output.numpy()]
        if component == "t5":
            return [ckpt.load_t5(torch.float32)(input_ids=t["input_ids"].long()).last_hidden_state.numpy()]
        if component == "transformer":
            model = ckpt.load_transformer(torch.float32)
            out = model(hidden_states=t["hidden_states"], encoder_hidden_states=t["encoder_hidden_states"],
                        pooled_projections=t["pooled_projections"], timestep=t["timestep"], img_ids=t["img_ids"],
                        txt_ids=t["txt_ids"], guidance=t.get("guidance"), return_dict=False)[0]
            return [out.numpy()]
        vae = ckpt.load_vae(torch.float32)
        if component == "vae_decoder":
            return [vae.decode(t["latent"]).sample.numpy()]
        return [vae.encode(t["images"]).latent_dist.mode().numpy()]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("component", ["clip", "t5", "transformer", "vae_decoder", "vae_encoder"])
def test_fp32_graph_matches_torch(variant, component, tiny_checkpoints, fp32_exports):
    ckpt = Checkpoint.open(tiny_checkpoints[variant])
    dims = ckpt.dims()
    session = ort.InferenceSession(str(fp32_exports[variant] / f"{component}.onnx"), providers=["CPUExecutionProvider"])
    for i, shape in enumerate(SHAPES):
        feed = feeds(component, dims, *shape, seed=i)
        got = session.run(None, feed)
        want = torch_reference(ckpt, component, feed)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            assert np.isfinite(g).all()
            np.testing.assert_allclose(g, w, err_msg=f"{variant} {component} at {shape}", **FP32_TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_graph_io_follows_spec(variant, fp32_exports, tiny_checkpoints):
    dims = Checkpoint.open(tiny_checkpoints[variant]).dims()
    manifest = json.loads((fp32_exports[variant] / "manifest.json").read_text())
    assert manifest["variant"] == variant and manifest["precision"] == "fp32"
    for name in ("clip", "t5", "transformer", "vae_decoder", "vae_encoder"):
        spec = component_spec(name, dims)
        model = onnx.load(str(fp32_exports[variant] / f"{name}.onnx"), load_external_data=False)
        assert [i.name for i in model.graph.input] == spec.input_names
        assert [o.name for o in model.graph.output] == spec.output_names
        for value, t in zip(model.graph.input, spec.inputs):
            got = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert [isinstance(g, str) for g in got] == [isinstance(d, str) for d in t.shape], (name, t.name, got)
    assert ("guidance" in component_spec("transformer", dims).input_names) == (variant == "dev")
    for sub in ("tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json", "scheduler/scheduler_config.json",
                "vae/config.json"):
        assert (fp32_exports[variant] / sub).is_file(), sub


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_exports(precision, tiny_checkpoints, half_exports):
    """fp16/bf16 graphs carry the right I/O dtypes and stay finite and close to the fp32 model.
    The VAE stays fp32 (fp16 overflows; ONNX Runtime has no bf16 Resize)."""
    ckpt = Checkpoint.open(tiny_checkpoints["dev"])
    folder = half_exports[precision]  # the session's exports of the dev checkpoint
    manifest = json.loads((folder / "manifest.json").read_text())
    expected_vae = "fp32"
    assert manifest["components"]["vae_decoder"]["precision"] == expected_vae
    assert manifest["components"]["transformer"]["precision"] == precision
    # each graph records the opset it was written at: bf16 graphs 22, the fp32 VAE of a bf16 export 20
    for name, record in manifest["components"].items():
        written = onnx.load(str(folder / record["file"]), load_external_data=False).opset_import
        assert record["opset"] == next(o.version for o in written if o.domain == "") == \
            (22 if record["precision"] == "bf16" else 20), name
    model = onnx.load(str(folder / "transformer.onnx"))
    elem = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[precision]
    assert model.graph.input[0].type.tensor_type.elem_type == elem
    assert model.graph.input[3].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # timestep stays float32
    dims = ckpt.dims()
    feed = feeds("transformer", dims, 2, 6, 64, 48)
    want = half_precision_reference(ckpt, feed, TORCH_DTYPES[precision])
    half_dtype = np.float16 if precision == "fp16" else ml_dtypes.bfloat16
    half = {k: v.astype(half_dtype) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections")
            else v for k, v in feed.items()}
    if precision == "fp16":
        got = ort.InferenceSession(str(folder / "transformer.onnx")).run(None, half)[0]
    else:  # ONNX Runtime's CPU kernels have no bfloat16: ONNX's reference evaluator does
        got = ReferenceEvaluator(str(folder / "transformer.onnx")).run(None, half)[0]
    got = got.astype(np.float32)
    assert np.isfinite(got).all()
    # same-precision torch model, a few roundings apart: 3% of the output range (measured: bf16 0.9%, fp16 2.4%
    # as ONNX Runtime's CPU fp16 kernels round differently from torch's)
    assert np.abs(got - want).max() < 0.03 * np.abs(want).max()


def half_precision_reference(ckpt: Checkpoint, feed: dict, dtype: torch.dtype) -> np.ndarray:
    """diffusers' transformer in ``dtype``, fed as diffusers' pipeline feeds it (everything cast to the model
    dtype, timestep and guidance included)."""
    model = ckpt.load_transformer(dtype)
    t = {k: torch.from_numpy(v) for k, v in feed.items()}
    with torch.no_grad():
        out = model(hidden_states=t["hidden_states"].to(dtype), encoder_hidden_states=t["encoder_hidden_states"].to(dtype),
                    pooled_projections=t["pooled_projections"].to(dtype), timestep=t["timestep"].to(dtype),
                    img_ids=t["img_ids"], txt_ids=t["txt_ids"], guidance=t["guidance"].to(dtype), return_dict=False)[0]
    return out.float().numpy()


def test_export_refuses_mixing_sources(tiny_checkpoints, fp32_exports):
    ckpt = Checkpoint.open(tiny_checkpoints["schnell"])
    with pytest.raises(ExportError, match="already holds a fp32 export of .*use another folder"):
        export_checkpoint(ckpt, fp32_exports["dev"], ExportRequest(("clip",), "fp32"))


def test_export_request_validation():
    with pytest.raises(ValueError, match="each must be one of"):
        ExportRequest(("unet",), "fp32")
    with pytest.raises(ValueError, match="precision 'int8' is not one of"):
        ExportRequest(("clip",), "int8")


def test_cli_export_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fluxrt.cli", "export", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "checkpoint folder" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_external_data_is_fingerprinted_and_a_changed_byte_refused(tiny_checkpoints, fp32_exports, tmp_path, capsys):
    """A graph's fingerprint covers its external data file: the same graph saved with external data gives
    the same images, and one byte changed in NAME.onnx.data is refused by name, through the API and the CLI."""
    import shutil

    from fluxrt.artifacts import ExportFolder
    from fluxrt.cli import main
    from fluxrt.runtime import FluxPipeline

    out = shutil.copytree(fp32_exports["dev"], tmp_path / "onnx")
    export_checkpoint(Checkpoint.open(tiny_checkpoints["dev"]), out,
                      ExportRequest(("transformer",), "fp32", external_data_bytes=0))
    record = ExportFolder.open(out).record("transformer")
    data = out / "transformer.onnx.data"
    assert sorted(record["fingerprint"]["files"]) == ["transformer.onnx", "transformer.onnx.data"]
    assert data.stat().st_size > record["weights_bytes"] * 0.9 > (out / "transformer.onnx").stat().st_size
    call = dict(prompt="a heron", height=32, width=48, num_inference_steps=2, seed=3, output_type="np")
    inline = FluxPipeline.load(fp32_exports["dev"])(**call).images
    np.testing.assert_array_equal(FluxPipeline.load(out)(**call).images, inline)

    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    message = r"transformer graph: .*transformer\.onnx\.data is not the file that was recorded .*export again"
    with pytest.raises(ExportError, match=message):
        FluxPipeline.load(out)
    png = tmp_path / "x.png"
    capsys.readouterr()
    code = main(["generate", "--onnx", str(out), "--prompt", "a heron", "--out", str(png), "--height", "32",
                 "--width", "32", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "transformer.onnx.data is not the file that was recorded" in err, err
    assert len(err.strip().splitlines()) == 1 and not png.exists()
    data.unlink()
    with pytest.raises(ExportError, match=r"transformer graph: .*transformer\.onnx\.data is missing"):
        ExportFolder.open(out).verified_graph("transformer")


def test_folders_of_an_older_format_are_refused(fp32_exports, tmp_path):
    """An export folder written before graph fingerprints covered external data (format 1) is not trusted."""
    import shutil

    from fluxrt.artifacts import EXPORT_FORMAT, ExportFolder
    from fluxrt.errors import ExportError

    out = shutil.copytree(fp32_exports["dev"], tmp_path / "old")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == EXPORT_FORMAT == "fluxrt-export/2"
    (out / "manifest.json").write_text(json.dumps(dict(manifest, format="fluxrt-export/1")))
    with pytest.raises(ExportError, match=r"format 'fluxrt-export/1', expected 'fluxrt-export/2' .*export again"):
        ExportFolder.open(out)
    del manifest["components"]["clip"]["fingerprint"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"components.clip.fingerprint must hold 'files' .* got None: export again"):
        ExportFolder.open(out).verified_graph("clip")


@pytest.mark.slow
def test_strided_initializers_are_written_contiguously_with_the_same_bytes(tiny_checkpoints, tmp_path):
    """The ort-kernels transformer's linears reach the writer as transposed (strided) NumPy views, which NumPy writes
    element by element (100 MB/s: four of the five minutes of the full FLUX export). write_program hands the writer
    contiguous copies one tensor at a time; the graph's tensors are byte for byte those of a plain save."""
    import onnx
    from onnx import numpy_helper

    from fluxrt.components import component_spec
    from fluxrt.export.checkpoint import Checkpoint
    from fluxrt.export.onnx_export import (contiguous_initializers, dynamic_shapes, example_inputs, load_graph_module,
                                           opset_for, write_program)
    from fluxrt.export import graphs

    ckpt = Checkpoint.open(tiny_checkpoints["dev"])
    spec = component_spec("transformer", ckpt.dims())

    def program():
        module = load_graph_module("transformer", ckpt, "fp32", "ort-kernels")
        with torch.no_grad():
            return torch.onnx.export(module, example_inputs(spec, ckpt.dims(), "fp32"), dynamo=True,
                                     opset_version=opset_for("fp32"), input_names=spec.input_names,
                                     output_names=spec.output_names, dynamic_shapes=dynamic_shapes(spec, ckpt.dims()),
                                     custom_translation_table=graphs.translation_table("ort-kernels"))

    ours = program()
    ours.save(str(tmp_path / "plain.onnx"), external_data=True)  # the exporter's own save, before any wrapping
    strided = sum(not v.const_value.raw.flags.c_contiguous for v in ours.model.graph.initializers.values()
                  if isinstance(getattr(v.const_value, "raw", None), np.ndarray))
    assert strided >= 2 * 6 + 2 * 2  # at least every double block's and single block's projections
    (tmp_path / "ours").mkdir()
    write_program(ours, tmp_path / "ours" / "transformer.onnx", external=True)
    assert contiguous_initializers(ours.model) == 0  # nothing strided is left to wrap

    def tensors(path):
        return {t.name: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
                for t in onnx.load(str(path)).graph.initializer}

    assert tensors(tmp_path / "ours" / "transformer.onnx") == tensors(tmp_path / "plain.onnx")
