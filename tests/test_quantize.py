"""fluxrt quantize: one FP8 calibration written as an export folder, run by ONNX Runtime on the CPU and
built into TensorRT-RTX plans without calibrating again; its graph and record are checked before use."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from fluxrt.artifacts import ExportFolder, graph_fingerprint
from fluxrt.cli import main
from fluxrt.errors import EngineError, ExportError
from fluxrt.runtime import FluxPipeline

pytest.importorskip("modelopt", reason="nvidia-modelopt (fluxrt[fp8]) is not installed")
FLAGS = ["--calibration-prompts", "2", "--calibration-steps", "2", "--calibration-size", "64",
         "--calibration-text-length", "16"]
CALL = dict(prompt="a lighthouse on a cliff", height=64, width=64, num_inference_steps=3, max_sequence_length=16,
            seed=11, output_type="np")
# the FP8 transformer's images against its fp16 source, same seed, tiny random model (measured: PSNR 54.3 dB,
# max difference 0.012 of the [0, 1] range, mean 0.0014)
PSNR_DB, MAX_ABS = 45.0, 0.04


@pytest.fixture(scope="module")
def fp8_export(half_exports, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantize") / "fp8"
    assert main(["quantize", str(half_exports["fp16"]), "--out", str(out), *FLAGS]) == 0
    return out


def test_folder_is_a_complete_fp8_export(fp8_export, half_exports):
    folder = ExportFolder.open(fp8_export)
    source = ExportFolder.open(half_exports["fp16"])
    assert folder.precision == "fp8" and folder.manifest["base_precision"] == "fp16"
    assert sorted(folder.manifest["components"]) == sorted(source.manifest["components"])
    for name in folder.manifest["components"]:
        folder.verified_graph(name)
        if name != "transformer":  # the other graphs are the source's, byte for byte: hard links on one disk
            assert folder.record(name)["fingerprint"] == source.record(name)["fingerprint"]
            for file in folder.record(name)["fingerprint"]["files"]:
                assert (fp8_export / file).stat().st_ino == (half_exports["fp16"] / file).stat().st_ino
    for sub in ("tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json", "scheduler/scheduler_config.json",
                "vae/config.json"):
        assert (fp8_export / sub).read_bytes() == (half_exports["fp16"] / sub).read_bytes()
    record = json.loads((fp8_export / "transformer.json").read_text())
    quantization = folder.record("transformer")["quantization"]
    assert quantization["source_fingerprint"] == source.record("transformer")["fingerprint"]["sha256"]
    assert record["calibration"]["num_prompts"] == 2 and record["settings"]["height"] == 64
    assert folder.graph_precision("transformer") == "fp16"  # activations in the base precision
    model = onnx.load(str(fp8_export / "transformer.onnx"))
    fp8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN
                   and len(t.dims) == 2]
    assert len(fp8_weights) == quantization["quantized"] > 0  # E4M3 weights stored in the graph


def test_fp8_export_runs_on_ort_cpu_close_to_its_source(fp8_export, half_exports):
    want = FluxPipeline.load(half_exports["fp16"])(**CALL).images
    got = FluxPipeline.load(fp8_export)(**CALL).images
    diff = np.abs(got.astype(np.float64) - want)
    psnr = 10 * np.log10(1 / (diff ** 2).mean())
    print(f"\nFP8 vs fp16 images: PSNR {psnr:.1f} dB, max {diff.max():.4f}, mean {diff.mean():.5f}")
    assert psnr > PSNR_DB and diff.max() < MAX_ABS and want.std() > 1e-3
    assert not np.array_equal(got, want)  # the quantized graph is the one that ran


def test_a_second_run_keeps_the_calibration(fp8_export, half_exports, capsys):
    before = graph_fingerprint(fp8_export / "transformer.onnx")
    assert main(["quantize", str(half_exports["fp16"]), "--out", str(fp8_export), *FLAGS]) == 0
    assert "kept" in capsys.readouterr().err
    assert graph_fingerprint(fp8_export / "transformer.onnx") == before


def test_records_that_do_not_match_the_graph_are_refused(fp8_export, tmp_path):
    out = shutil.copytree(fp8_export, tmp_path / "fp8")
    record = json.loads((out / "transformer.json").read_text())
    (out / "transformer.json").write_text(json.dumps(dict(record, fingerprint={"files": {}, "sha256": "0" * 64})))
    with pytest.raises(ExportError, match=r"transformer calibration record .*transformer.json does not describe "
                                          r".*transformer.onnx .*run fluxrt quantize again"):
        FluxPipeline.load(out)
    shutil.copyfile(fp8_export / "transformer.json", out / "transformer.json")
    FluxPipeline.load(out)
    raw = bytearray((out / "transformer.onnx").read_bytes())
    raw[-100] ^= 0x01
    (out / "transformer.onnx").write_bytes(bytes(raw))
    with pytest.raises(ExportError, match=r"transformer graph: .*transformer.onnx is not the file that was recorded"):
        FluxPipeline.load(out)


def test_refusals(fp8_export, half_exports, fp32_exports, tmp_path, capsys):
    for argv, message in (
            ([str(fp32_exports["dev"]), "--out", str(tmp_path / "a")], "holds fp32 graphs; fluxrt quantize takes"),
            ([str(half_exports["fp16"]), "--out", str(half_exports["fp16"] / "sub")], "is, contains or lies inside"),
            ([str(half_exports["bf16"]), "--out", str(fp8_export)], "already holds another export"),
            ([str(half_exports["fp16"]), "--out", str(tmp_path / "b"), "--calibration-size", "70"],
             "--calibration-size must be a multiple of 16 pixels, got 70")):
        capsys.readouterr()
        assert main(["quantize", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_engines_build_from_the_fp8_export_without_calibrating(fp8_export, tmp_path):
    trt = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX (fluxrt[trt-rtx]) is not installed")
    from fluxrt.artifacts import EngineFolder
    from fluxrt.components import ShapeEnvelope
    from fluxrt.engines.folder import BuildSettings, build_folder
    from fluxrt.trt import library_info

    envelope = ShapeEnvelope(batch=(1, 1, 2), text_length=(1, 16, 32), image_side=(32, 64, 64))
    settings = BuildSettings(precision="fp8", envelope=envelope, compute_capabilities=("SM89",),
                             components=("transformer",))
    out = tmp_path / "eng"
    assert build_folder(fp8_export, out, settings, trt_module=trt, progress=False) == {"transformer": "built"}
    assert not (out / "transformer.fp8.onnx").exists()  # nothing calibrated here: the export's graph and scales
    folder = EngineFolder.open(out)
    assert folder.sidecar("transformer")["onnx_fingerprint"] == \
        ExportFolder.open(fp8_export).record("transformer")["fingerprint"]["sha256"]
    assert folder.verify_plan("transformer", library_info(trt), None) == out / "transformer.plan"
    with pytest.raises(EngineError, match="is an FP8 export .*: build it with --precision fp8"):
        build_folder(fp8_export, out, BuildSettings(precision="fp16", envelope=envelope), trt_module=trt)


def test_graphs_are_copied_where_hard_links_fail(tmp_path, monkeypatch):
    """On a file system without hard links (or across two), the other graphs are copied, and only complete files
    appear under their names."""
    import os

    from fluxrt.engines.quantize import link_or_copy

    src = tmp_path / "t5.onnx"
    src.write_bytes(b"graph" * 1000)

    def refuse(a, b):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    link_or_copy(src, tmp_path / "copy.onnx")
    assert (tmp_path / "copy.onnx").read_bytes() == src.read_bytes()
    assert (tmp_path / "copy.onnx").stat().st_ino != src.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx", "t5.onnx"]
