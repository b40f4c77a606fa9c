"""Engine folders built for real with TensorRT-RTX (or TensorRT) from the tiny model's exports:
plans for every component and precision, their profiles, the cache, refusal of stale plans,
and the runner against ONNX Runtime where a GPU and TensorRT exist."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from fluxrt.artifacts import EngineFolder, ExportFolder, current_gpu, graph_fingerprint
from fluxrt.components import ShapeEnvelope, component_spec
from fluxrt.engines.folder import BuildSettings, build_folder, up_to_date
from fluxrt.engines.profiles import profile_shapes
from fluxrt.errors import EngineError, ExportError, InvalidInputError
from fluxrt.trt import library_info

trt = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX (fluxrt[trt-rtx]) is not installed")
ENVELOPE = ShapeEnvelope(batch=(1, 2, 4), text_length=(1, 64, 128), image_side=(32, 64, 128))
TARGETS = ("SM89", "SM120")
DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def settings(precision: str, **kw) -> BuildSettings:
    return BuildSettings(precision=precision, envelope=ENVELOPE, compute_capabilities=TARGETS, **kw)


# build_folder(EXPORT, OUT, settings(PRECISION)) in a process of its own; prints its actions as JSON
BUILD_IN_CHILD = """import json, sys
import tensorrt_rtx_bindings as trt
from fluxrt.components import ShapeEnvelope
from fluxrt.engines.folder import BuildSettings, build_folder
export, out, precision, envelope, targets = sys.argv[1:6]
envelope = ShapeEnvelope(**{k: tuple(v) for k, v in json.loads(envelope).items()})
settings = BuildSettings(precision=precision, envelope=envelope, compute_capabilities=tuple(json.loads(targets)))
print(json.dumps(build_folder(export, out, settings, trt_module=trt, progress=False)))
"""


@pytest.fixture(scope="session")
def engine_dirs(half_exports, tmp_path_factory) -> dict[str, object]:
    """Both folders at once, bf16 in a child process (a build uses one core)."""
    import dataclasses

    from child_process import Child

    root = tmp_path_factory.mktemp("engines")
    with Child(BUILD_IN_CHILD, half_exports["bf16"], root / "bf16", "bf16", json.dumps(dataclasses.asdict(ENVELOPE)),
               json.dumps(TARGETS)) as bf16:
        actions = {"fp16": build_folder(half_exports["fp16"], root / "fp16", settings("fp16"), trt_module=trt,
                                        progress=False)}
        actions["bf16"] = json.loads(bf16.wait().strip().splitlines()[-1])
    for precision in ("fp16", "bf16"):
        assert set(actions[precision].values()) == {"built"}, (precision, actions)
    return {p: root / p for p in ("fp16", "bf16")}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_plans_have_spec_io_and_profiles(precision, engine_dirs):
    folder = EngineFolder.open(engine_dirs[precision])
    assert folder.precision == precision and folder.variant == "dev"
    for name in ("clip", "t5", "transformer", "vae_decoder"):
        spec = component_spec(name, folder.dims)
        meta = folder.sidecar(name)
        assert meta["compute_capabilities"] == list(TARGETS)
        assert meta["library"] == "tensorrt-rtx" and meta["build_seconds"] > 0
        # the plan names the very export graph it was built from, by the export's own fingerprint
        assert meta["onnx_fingerprint"] == folder.expected_graph(name) is not None
        inputs = {t["name"]: t for t in meta["io"]["inputs"]}
        assert list(inputs) == spec.input_names
        assert [t["name"] for t in meta["io"]["outputs"]] == spec.output_names
        graph_precision = "fp32" if name == "vae_decoder" else precision
        for t in spec.inputs:
            assert inputs[t.name]["dtype"] == t.resolved_dtype(graph_precision)
        for input_name, (lo, opt, hi) in profile_shapes(spec, ENVELOPE, folder.dims).items():
            assert inputs[input_name]["profile"] == [list(lo), list(opt), list(hi)]
    transformer = {t["name"]: t for t in folder.sidecar("transformer")["io"]["inputs"]}
    assert transformer["encoder_hidden_states"]["profile"][0][1] == 1  # text length stays dynamic: 1..128
    assert transformer["encoder_hidden_states"]["profile"][2][1] == 128
    assert transformer["hidden_states"]["profile"][2][:2] == [4, (128 // 16) ** 2]


def test_second_build_is_a_noop_and_changes_rebuild_only_what_changed(half_exports, engine_dirs, tmp_path):
    # the first build: the session's fp16 folder (every plan built, test_plans_have_spec_io_and_profiles), copied
    out = shutil.copytree(engine_dirs["fp16"], tmp_path / "eng")
    plans = {p.name: p.stat().st_mtime_ns for p in out.glob("*.plan")}
    assert sorted(plans) == ["clip.plan", "t5.plan", "transformer.plan", "vae_decoder.plan"]
    start = time.perf_counter()
    actions = build_folder(half_exports["fp16"], out, settings("fp16"), trt_module=trt, progress=False)
    assert set(actions.values()) == {"kept"} and time.perf_counter() - start < 5
    assert plans == {p.name: p.stat().st_mtime_ns for p in out.glob("*.plan")}

    # a graph changed behind the manifest's back is refused; changed as a re-export does (the manifest
    # records its new fingerprint), it rebuilds exactly that component
    changed = tmp_path / "export"
    shutil.copytree(half_exports["fp16"], changed)
    import onnx

    model = onnx.load(str(changed / "t5.onnx"))
    model.doc_string = "touched"
    onnx.save(model, str(changed / "t5.onnx"))
    with pytest.raises(ExportError, match=r"t5 graph: .*t5.onnx is not the file that was recorded"):
        build_folder(changed, out, settings("fp16"), trt_module=trt, progress=False)
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["components"]["t5"]["fingerprint"] = graph_fingerprint(changed / "t5.onnx")
    (changed / "manifest.json").write_text(json.dumps(manifest))
    actions = build_folder(changed, out, settings("fp16"), trt_module=trt, progress=False)
    assert actions == {"clip": "kept", "t5": "built", "transformer": "kept", "vae_decoder": "kept"}

    # a corrupted plan is rebuilt; other settings rebuild everything
    (out / "clip.plan").write_bytes(b"garbage")
    assert build_folder(changed, out, settings("fp16"), trt_module=trt, progress=False)["clip"] == "built"
    actions = build_folder(changed, out, settings("fp16", optimization_level=2), trt_module=trt, progress=False)
    assert set(actions.values()) == {"built"}


def test_stale_or_foreign_plans_are_refused(engine_dirs, tmp_path):
    out = shutil.copytree(engine_dirs["fp16"], tmp_path / "eng")
    folder = EngineFolder.open(out)
    lib = {"library": "tensorrt-rtx", "version": trt.__version__}
    assert folder.verify_plan("t5", lib, None) == out / "t5.plan"
    with pytest.raises(EngineError, match="was built with tensorrt-rtx .*; this machine has tensorrt 10.9.0: rebuild"):
        folder.verify_plan("t5", {"library": "tensorrt", "version": "10.9.0"}, None)
    with pytest.raises(EngineError, match=r"was built for \['SM89', 'SM120'\]; this GPU \(H100\) is SM90"):
        folder.verify_plan("t5", lib, {"name": "H100", "compute_capability": "SM90"})
    (out / "t5.plan").write_bytes((out / "t5.plan").read_bytes()[:-10])
    with pytest.raises(EngineError, match="t5 plan .* does not match its sidecar: corrupted or replaced"):
        folder.verify_plan("t5", lib, None)
    (out / "clip.plan.json").write_text("{not json")
    with pytest.raises(EngineError, match="clip plan sidecar .*clip.plan.json is not readable JSON"):
        folder.verify_plan("clip", lib, None)
    assert up_to_date(out, "clip", "x", settings("fp16"), lib) == "its sidecar is unreadable"


def test_precision_must_match_the_export(fp32_exports, tmp_path):
    with pytest.raises(EngineError, match="holds fp32 graphs; engines are strongly typed .* export with "
                                          "--precision fp16"):
        build_folder(fp32_exports["dev"], tmp_path / "e", settings("fp16"), trt_module=trt, progress=False)
    with pytest.raises(EngineError, match=r"FP8 engines are built from an FP8 export \(fluxrt quantize\) or an fp16 "
                                          r"or bf16 one"):
        build_folder(fp32_exports["dev"], tmp_path / "e", settings("fp8"), trt_module=trt, progress=False)
    with pytest.raises(ValueError, match="BuildSettings.precision 'int8' is not one of"):
        settings("int8")


def test_fp8_folder_from_fp16_export_trusts_its_fp8_graph_only_while_its_own_fingerprint_matches(half_exports, tmp_path):
    """fp8: the transformer is calibrated from the export folder alone, its Q/DQ graph kept beside
    the plan, the other components built from the export; a second build reuses both."""
    pytest.importorskip("modelopt", reason="nvidia-modelopt (fluxrt[fp8]) is not installed")
    from fluxrt.engines.fp8 import Fp8Settings

    calibration = Fp8Settings(num_prompts=2, num_inference_steps=2, height=64, width=64, max_sequence_length=16)
    out = tmp_path / "fp8"
    actions = build_folder(half_exports["fp16"], out, settings("fp8", fp8=calibration), trt_module=trt,
                           progress=False)
    assert set(actions.values()) == {"built"}
    assert (out / "transformer.fp8.onnx").is_file()
    record = json.loads((out / "transformer.fp8.json").read_text())
    calibration_dict = settings("fp8", fp8=calibration).fp8_settings_dict()
    assert record["calibration"]["num_prompts"] == 2
    assert record["source"]["fingerprint"] == ExportFolder.open(half_exports["fp16"]).record("transformer")[
        "fingerprint"]["sha256"]
    assert record["fingerprint"] == graph_fingerprint(out / "transformer.fp8.onnx")
    folder = EngineFolder.open(out)
    assert folder.precision == "fp8"
    assert folder.sidecar("transformer")["onnx"].endswith("transformer.fp8.onnx")
    assert folder.sidecar("t5")["precision"] == "fp16"
    again = build_folder(half_exports["fp16"], out, settings("fp8", fp8=calibration), trt_module=trt, progress=False)
    assert set(again.values()) == {"kept"}
    # the FP8 graph is reused only while its files match its own record: a plain graph copied over it is not
    from fluxrt.engines.fp8 import reusable_calibration

    graph, source = out / "transformer.fp8.onnx", record["source"]["fingerprint"]
    assert reusable_calibration(graph, source, calibration_dict) == record
    assert reusable_calibration(graph, "0" * 64, calibration_dict) is None  # another source graph
    assert reusable_calibration(graph, source, dict(calibration_dict, num_prompts=3)) is None  # other settings
    fp8_graph = graph.read_bytes()
    shutil.copyfile(half_exports["fp16"] / "transformer.onnx", graph)
    assert reusable_calibration(graph, source, calibration_dict) is None
    graph.write_bytes(fp8_graph)
    assert reusable_calibration(graph, source, calibration_dict) == record
    assert folder.verify_plan("transformer", library_info(trt), None) == out / "transformer.plan"


def bfl_style_folder(export_dir, out):
    """Our graphs in the layout of Black Forest Labs' published ONNX repositories."""
    for name, sub in (("clip", "clip.opt"), ("t5", "t5.opt"), ("transformer", "transformer.opt/fp16"),
                      ("vae_decoder", "vae.opt")):
        (out / sub).mkdir(parents=True)
        shutil.copy(export_dir / f"{name}.onnx", out / sub / "model.onnx")
    return out


def test_builds_from_a_bfl_style_onnx_folder(half_exports, tmp_path):
    src = bfl_style_folder(half_exports["fp16"], tmp_path / "FLUX.1-dev-onnx")
    actions = build_folder(src, tmp_path / "eng", settings("fp16"), trt_module=trt, progress=False)
    assert set(actions.values()) == {"built"}
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "eng").glob("*.plan")}
    folder = EngineFolder.open(tmp_path / "eng")
    assert folder.variant == "dev" and folder.dims.joint_attention_dim == 32 and folder.precision == "fp16"
    assert folder.sidecar("transformer")["onnx"].endswith("transformer.opt/fp16/model.onnx")
    # the CLI takes the same folder: same settings, so every plan is kept
    from fluxrt.cli import main

    assert main(["build", str(src), "--out", str(tmp_path / "eng"), "--precision", "fp16", "--batch", "1,2,4",
                 "--text-length", "1,64,128", "--image-side", "32,64,128", "--compute-capability", "SM89,SM120",
                 "--optimization-level", "3", "--library", "tensorrt-rtx"]) == 0
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in (tmp_path / "eng").glob("*.plan"))
    (src / "transformer.opt" / "bf16").mkdir()
    shutil.copy(half_exports["bf16"] / "transformer.onnx", src / "transformer.opt" / "bf16" / "model.onnx")
    with pytest.raises(ExportError, match="two transformer graphs"):
        build_folder(src, tmp_path / "eng", settings("fp16"), trt_module=trt, progress=False)


def test_engine_folder_errors(tmp_path):
    with pytest.raises(EngineError, match="engine folder .* does not exist"):
        EngineFolder.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="engine folder index .*engines.json is missing"):
        EngineFolder.open(tmp_path / "empty")


def gpu_trt():
    """The TensorRT module that can run plans here, or a skip with the reason."""
    gpu = current_gpu()
    if gpu is None:
        pytest.skip("no CUDA GPU (cupy) on this machine: TensorRT plans cannot execute")
    for name in ("tensorrt", "tensorrt_rtx_bindings"):
        try:
            return __import__(name), gpu
        except ImportError:
            continue
    pytest.skip("no TensorRT module")


@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_trt_runner_matches_onnx_runtime(precision, half_exports, tmp_path):
    """Runs where a GPU and TensorRT exist: engine outputs vs ONNX Runtime's on the same graphs."""
    module, gpu = gpu_trt()
    import onnxruntime as ort

    from fluxrt.runtime.trt import TrtRunner

    targets = None if module.__name__ == "tensorrt" else (gpu["compute_capability"],)
    out = tmp_path / "eng"
    build_folder(half_exports[precision], out, BuildSettings(precision=precision, envelope=ENVELOPE,
                                                             compute_capabilities=targets), trt_module=module)
    folder = EngineFolder.open(out)
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 150, (2, 33)).astype(np.int32)}
    runner = TrtRunner.from_engine_folder(folder, "t5", module).activate()
    got = runner.infer(feed)["text_embeddings"].get()
    want = ort.InferenceSession(str(half_exports[precision] / "t5.onnx"),
                                providers=ort.get_available_providers()).run(None, feed)[0]
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2, rtol=2e-2)


def test_cli_refuses_sizes_outside_the_engines_before_loading(engine_dirs, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "fluxrt.cli", "generate", "--engines", str(engine_dirs["fp16"]),
                        "--prompt", "x", "--out", str(tmp_path / "x.png"), "--height", "256", "--width", "64"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "height 256 is outside the engines' range 32..128 pixels" in r.stderr


# ---- LoRA on TensorRT: refittable plans and the refitter (runtime/trt.py) ----------------------------------------

def peft_file(path, module: str, dim: int, seed: int = 0, rank: int = 2):
    """A diffusers/peft LoRA file of one linear (no metadata: m = 1)."""
    from safetensors.numpy import save_file

    g = np.random.default_rng(seed)
    save_file({f"transformer.{module}.lora_A.weight": (g.standard_normal((rank, dim)) * 0.1).astype(np.float32),
               f"transformer.{module}.lora_B.weight": (g.standard_normal((dim, rank)) * 0.1).astype(np.float32)},
              str(path))
    return path


def tiny_dim(folder) -> int:
    config = folder.transformer_config()
    return config["num_attention_heads"] * config["attention_head_dim"]


def test_refittable_builds_are_asked_of_tensorrt_and_refused_where_they_cannot_work(half_exports, tmp_path):
    """``--refittable``: BuilderFlag.REFIT on the transformer's plan, recorded in its sidecar and settings (plans
    built before keep their settings key). CI's TensorRT-RTX 1.7 has no GPU and cannot build such a plan (its
    Myelin compiler checks for CUDA): the error says so and names the flag. FP8 and a build without the
    transformer are refused before anything is built."""
    assert "refittable" not in settings("fp16").cache_key()
    assert settings("fp16", refittable=True).cache_key()["refittable"] is True
    with pytest.raises(EngineError, match=r"--refittable with --precision fp8: TensorRT refits weights, not the FP8 "
                                          r"quantization around them"):
        build_folder(half_exports["fp16"], tmp_path / "a", settings("fp8", refittable=True), trt_module=trt,
                     progress=False)
    with pytest.raises(EngineError, match=r"--refittable makes the transformer's plan refittable .* but --components "
                                          r"clip builds no transformer"):
        build_folder(half_exports["fp16"], tmp_path / "b", settings("fp16", refittable=True, components=("clip",)),
                     trt_module=trt, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    out = tmp_path / "c"
    one = settings("fp16", refittable=True, components=("transformer",))
    if current_gpu() is None:
        with pytest.raises(EngineError, match=r"TensorRT could not build the engine \(a refittable plan: "
                                              r"tensorrt_rtx_bindings .* may need a GPU to build one; build without "
                                              r"--refittable, or on the GPU\)"):
            build_folder(half_exports["fp16"], out, one, trt_module=trt, progress=False)
        assert not list(out.glob("transformer.plan*"))
    else:
        assert build_folder(half_exports["fp16"], out, one, trt_module=trt, progress=False) == {"transformer": "built"}
        meta = EngineFolder.open(out).sidecar("transformer")
        assert meta["refittable"] is True and meta["settings"]["refittable"] is True


def test_lora_on_tensorrt_needs_a_refittable_plan_and_its_source_graph(engine_dirs, tmp_path):
    """A plan built without --refittable refuses a LoRA, naming the flag; one whose sidecar says refittable takes
    its pristine weights from the export it was built from, which must still hold that graph (the export
    manifest's fingerprint against the sidecar's), and checks a LoRA against that graph's linears before any
    refit (no GPU needed for either)."""
    from fluxrt.lora import read_lora
    from fluxrt.runtime.trt import TrtRunner, refit_source

    folder = EngineFolder.open(engine_dirs["fp16"])
    config = folder.transformer_config()
    dim = tiny_dim(folder)
    good = read_lora(peft_file(tmp_path / "q.safetensors", "transformer_blocks.0.attn.to_q", dim), config)
    runner = TrtRunner.from_engine_folder(folder, "transformer", trt)
    assert runner.refit_source is None
    with pytest.raises(InvalidInputError, match=r"transformer \(trt\): plan .*transformer.plan was built without "
                                                r"--refittable, so TensorRT cannot change its weights; rebuild it "
                                                r"with fluxrt build ... --refittable \(fp16/bf16\), or run the export "
                                                r"folder on ort-cuda for LoRA"):
        runner.set_loras([(good, 1.0)])
    runner.set_loras([])  # nothing loaded, nothing asked: no refit, no error

    copy = tmp_path / "eng"
    shutil.copytree(engine_dirs["fp16"], copy)
    sidecar = copy / "transformer.plan.json"
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(dict(meta, refittable=True)))
    refittable = EngineFolder.open(copy)
    export = Path(refittable.meta["export"]["path"])
    assert refit_source(refittable, "transformer") == ExportFolder.open(export).graph_path("transformer")
    runner = TrtRunner(refittable.spec("transformer"), "fp16", copy / "transformer.plan", trt,
                       refit_source(refittable, "transformer"))
    runner.set_loras([(good, 0.5)])  # checked against the source graph; refitted when the runner activates
    assert runner._loras == ((good, 0.5),)
    linears = runner.linears()  # the source graph's: where the refit's weights come from and go
    assert linears.path == refit_source(refittable, "transformer")
    assert linears.shapes["transformer_blocks.0.attn.to_q"] == (dim, dim)
    merged = linears.merged([(good, 0.5)], {"transformer_blocks.1.attn.to_k"})  # a dropped LoRA's linear: its own
    assert len(merged) == 2 and all(str(w.dtype) == "float16" for w in merged.values())

    index = copy / "engines.json"
    data = json.loads(index.read_text())
    index.write_text(json.dumps(dict(data, export=dict(data["export"], path=str(tmp_path / "gone")))))
    assert "which cannot be read" in refit_source(EngineFolder.open(copy), "transformer")
    sidecar.write_text(json.dumps(dict(meta, refittable=True, onnx_fingerprint="0" * 64)))
    index.write_text(json.dumps(data))
    reason = refit_source(EngineFolder.open(copy), "transformer")
    assert f"the export folder {export} no longer holds the transformer graph plan" in reason
    runner = TrtRunner(refittable.spec("transformer"), "fp16", copy / "transformer.plan", trt, reason)
    with pytest.raises(InvalidInputError, match=r"no longer holds the transformer graph plan .*\(exported again since\?\)"):
        runner.set_loras([(good, 1.0)])


@pytest.mark.trt
def test_refitted_lora_images_equal_onnx_runtimes_and_unload_restores_the_plan(half_exports, tmp_path):
    """Runs where a GPU and TensorRT exist: a refittable fp16 plan with a LoRA loaded gives the transformer
    output ONNX Runtime gives with the same LoRA merged (fp16 tolerance), and after unloading the plan's own
    output again, bit for bit."""
    module, gpu = gpu_trt()
    from fluxrt.lora import read_lora
    from fluxrt.runtime.ort import OrtRunner
    from fluxrt.runtime.trt import TrtRunner

    targets = None if module.__name__ == "tensorrt" else (gpu["compute_capability"],)
    out = tmp_path / "eng"
    build_folder(half_exports["fp16"], out, BuildSettings(precision="fp16", envelope=ENVELOPE, refittable=True,
                                                          compute_capabilities=targets,
                                                          components=("transformer",)), trt_module=module)
    folder = EngineFolder.open(out)
    lora = read_lora(peft_file(tmp_path / "q.safetensors", "transformer_blocks.0.attn.to_q", tiny_dim(folder), rank=4),
                     folder.transformer_config())
    export = ExportFolder.open(half_exports["fp16"])
    spec = export.spec("transformer")
    rng = np.random.default_rng(0)
    feed = {t.name: (rng.standard_normal([2 if d == "B" else (16 if isinstance(d, str) else d) for d in t.shape])
                     .astype(np.float32)) for t in spec.inputs}
    trt_runner = TrtRunner.from_engine_folder(folder, "transformer", module).activate()
    feed = {k: v.astype(trt_runner.input_dtype(k)) for k, v in feed.items()}
    base = trt_runner.infer(feed)["latent"].get()
    trt_runner.set_loras([(lora, 1.0)])
    got = trt_runner.infer(feed)["latent"].get()
    ort_runner = OrtRunner(spec, "fp16", export.verified_graph("transformer"), "ort-cuda").activate()
    ort_runner.set_loras([(lora, 1.0)])
    want = ort_runner.infer(feed)["latent"].get()
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2, rtol=2e-2)
    assert np.abs(got.astype(np.float32) - base.astype(np.float32)).max() > 1e-2  # the LoRA did something
    trt_runner.set_loras([])
    np.testing.assert_array_equal(trt_runner.infer(feed)["latent"].get(), base)
