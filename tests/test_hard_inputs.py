"""Hard inputs, second round (issue 13): each test guards one class of failure -- backend errors wrapped with
the stage and backend, memory refused up front, output folders apart from their sources, exports locked,
outputs checked before the work, text that is not text, bf16 on the CPU -- on the tiny model, through the
CLI (exit 2, one line, no traceback) and the API."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cli_calls import cli
from fluxrt.artifacts import ExportFolder
from fluxrt.cli import main
from fluxrt.errors import EngineError, InvalidInputError
from fluxrt.runtime import FluxPipeline, memory
from fluxrt.runtime.ort import OrtRunner

GEN = ["--height", "64", "--width", "64", "--steps", "1", "--max-sequence-length", "16"]
FLUXRT = "import sys; from fluxrt.cli import main; sys.exit(main(sys.argv[1:]))"  # python -c FLUXRT ARGV...


def one_line_error(code: int, stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.strip().splitlines() if "error:" in line or "Traceback" in line]
    assert code == 2 and "Traceback" not in stderr and len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_backend_failures_are_engine_errors_naming_stage_backend_and_message(fp32_exports):
    """ONNX Runtime's own exception (text ids that do not match the text's length) becomes an EngineError."""
    folder = ExportFolder.open(fp32_exports["dev"])
    runner = OrtRunner(folder.spec("transformer"), "fp32", folder.verified_graph("transformer")).activate()
    g = np.random.default_rng(0)
    feed = dict(hidden_states=g.standard_normal((1, 16, 64)).astype(np.float32),
                encoder_hidden_states=g.standard_normal((1, 8, 32)).astype(np.float32),
                pooled_projections=g.standard_normal((1, 32)).astype(np.float32),
                timestep=np.ones(1, np.float32), img_ids=np.zeros((16, 3), np.float32),
                txt_ids=np.zeros((5, 3), np.float32), guidance=np.ones(1, np.float32))
    with pytest.raises(EngineError, match=r"^transformer \(ort-cpu\): running failed: .*\S") as e:
        runner.infer(feed)
    assert "\n" not in str(e.value)


def test_memory_estimate_refuses_before_any_stage(fp32_exports, tmp_path, monkeypatch):
    """4096² on portable attention, or 10^12 images, is refused at once with the estimate and what is
    available; the same call with room enough runs."""
    base = ["generate", "--onnx", fp32_exports["dev"], "--prompt", "a fox", "--steps", "1"]
    start = time.perf_counter()
    code, err = cli(base + ["--height", "4096", "--width", "4096", "--out", tmp_path / "a.png"])
    one_line_error(code, err, "need an estimated", "GiB of host memory for the transformer stage", "available",
                   "--height/--width")
    code, err = cli(base + ["--height", "64", "--width", "64", "--num-images", 10**12, "--out", tmp_path / "b.png"])
    one_line_error(code, err, "1000000000000 image(s)", "need an estimated")
    assert time.perf_counter() - start < 20 and not list(tmp_path.iterdir())
    monkeypatch.setattr(memory, "host_available", lambda: 2**20)  # 1 MiB left
    with pytest.raises(InvalidInputError, match=r"need an estimated 0\.\d GiB of host memory for the "
                                                r"(transformer|vae_decoder) stage, and 0\.0 GiB is available"):
        FluxPipeline.load(fp32_exports["dev"])("a fox", height=64, width=64, num_inference_steps=1)
    est = memory.estimate(ExportFolder.open(fp32_exports["dev"]),
                          FluxPipeline.load(fp32_exports["dev"]).params("a", height=1024, width=1024))
    # portable attention at 1024²: 2 heads x (4096 + 512)² scores and softmax, float32
    assert est["transformer"] >= 2 * 2 * 4608 ** 2 * 4


def test_output_folder_inside_its_source_is_refused(tiny_checkpoints, fp32_exports, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoints["dev"], tmp_path / "ck")
    before = sorted(p.name for p in ckpt.iterdir())
    for out in (ckpt, ckpt / "onnx", tmp_path):
        code, err = cli(["export", ckpt, "--out", out, "--components", "clip"])
        one_line_error(code, err, f"--out {out} is, contains or lies inside the checkpoint folder")
    assert sorted(p.name for p in ckpt.iterdir()) == before
    export = shutil.copytree(fp32_exports["dev"], tmp_path / "onnx")
    code, err = cli(["build", export, "--out", export / "engines", "--precision", "fp16"])
    one_line_error(code, err, "lies inside the export folder")
    assert not (export / "engines").exists()


def test_concurrent_exports_into_one_folder_are_serialized(tiny_checkpoints, tmp_path):
    """Two exports of different components into one folder: both land in the manifest."""
    out = tmp_path / "onnx"
    codes = []
    threads = [threading.Thread(target=lambda c=c: codes.append(
        main(["export", str(tiny_checkpoints["dev"]), "--out", str(out), "--components", c]))) for c in ("clip", "t5")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [0, 0]
    assert {"clip", "t5"} <= set(ExportFolder.open(out).manifest["components"])


def test_bf16_exports_on_the_cpu_are_refused_with_the_backends_that_run_them(half_exports):
    with pytest.raises(EngineError, match=r"bf16 graphs, which ONNX Runtime cannot run on the CPU .* --backend "
                                          r"ort-cuda, build TensorRT engines from them, or export fp32 or fp16"):
        FluxPipeline.load(half_exports["bf16"])


def test_outputs_are_checked_before_any_stage_and_leave_nothing_behind(fp32_exports, tmp_path):
    base = ["generate", "--onnx", fp32_exports["dev"], "--prompt", "a fox", *GEN]
    (tmp_path / "dir.png").mkdir()
    blocked = tmp_path / "file"
    blocked.write_text("")
    for out, needle in ((tmp_path / "dir.png", "is a folder"), ("/proc/fluxrt/x.png", "cannot be written"),
                        (blocked / "x.png", "cannot be written")):
        start = time.perf_counter()
        code, err = cli(base + ["--out", out])
        one_line_error(code, err, needle)
        assert time.perf_counter() - start < 10
    code, err = cli(base + ["--out", tmp_path / "many" / "x.png", "--num-images", 3])
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["x-0.png", "x-1.png", "x-2.png"]
    mode = stat.S_IMODE((tmp_path / "many" / "x-0.png").stat().st_mode)
    assert mode == 0o666 & ~memory_umask()


def memory_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_text_that_is_not_unicode_is_refused(fp32_exports, tmp_path):
    code, err = cli(["generate", "--onnx", fp32_exports["dev"], "--prompt", "caf\udce9", *GEN,
                     "--out", tmp_path / "x.png"])  # what Python makes of the byte 0xE9 in argv
    one_line_error(code, err, "--prompt is not valid UTF-8 text: b'\\xe9' at character 3")
    pipe = FluxPipeline.load(fp32_exports["dev"])
    with pytest.raises(InvalidInputError, match=r"prompt 1 is not valid Unicode text: '\\ud800' at character 1"):
        pipe(["fine", "a\ud800b"], height=64, width=64, num_inference_steps=1)


def test_smaller_checks(fp32_exports, tmp_path):
    pipe = FluxPipeline.load(fp32_exports["dev"])
    with pytest.raises(InvalidInputError, match="callback must be a function of \\(step, steps\\) or None, got 5"):
        pipe("a", height=64, width=64, num_inference_steps=1, callback=5)
    latents = np.random.default_rng(0).standard_normal((1, 16, 64)).astype(np.float32)
    out = pipe("a", height=64, width=64, num_inference_steps=1, latents=latents, seed=7, output_type="np")
    assert out.settings["seed"] is None  # the latents were used, not the seed
    code, err = cli(["generate", "--engines", fp32_exports["dev"], "--prompt", "a", "--out", tmp_path / "x.png"])
    one_line_error(code, err, "is an export folder, not an engines folder: pass it with --onnx")
    start = time.perf_counter()
    code, err = cli(["tiny-model", tmp_path / "t", "--seed", 2**64])
    one_line_error(code, err, "seed must be an integer in [0, 2**63 - 1]")
    assert time.perf_counter() - start < 5 and not (tmp_path / "t").exists()
    with contextlib.redirect_stdout(io.StringIO()) as help_text:
        with pytest.raises(SystemExit) as e:
            main(["bench-synthetic", "--help"])
    assert e.value.code == 0 and "--reuse-exports" in help_text.getvalue()


def test_numeric_errors_suggest_what_the_precision_allows():
    from fluxrt.components import ModelDims, component_spec
    from fluxrt.errors import NumericError
    from fluxrt.runner import Runner
    from fluxrt.runtime.loop import run_stage

    class Inf(Runner):
        backend = "test"

        def _activate(self):
            pass

        def _infer(self, feed):
            return {"latent": np.full((1, 4, 64), np.inf, np.float32)}

    spec = component_spec("vae_decoder", ModelDims("dev"))
    for precision, hint in (("fp16", "try a bf16 or fp32 export"), ("fp32", "the graph or its inputs are broken")):
        runner = Inf(spec, precision).activate()
        with pytest.raises(NumericError, match=hint):
            run_stage(runner, {"latent": np.zeros((1, 16, 8, 8), np.float16 if precision == "fp16" else np.float32)})


def test_files_are_written_with_the_usual_mode(tmp_path):
    from fluxrt.files import atomic_write_json

    atomic_write_json(tmp_path / "a.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~memory_umask()
    assert Path(tmp_path / "a.json").read_text().strip().startswith("{")


def write_safetensors_header(path: Path, header, payload: bytes = b"") -> None:
    import json
    import struct

    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)


def corrupt_int8(ck: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    f = ck / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    key = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)
    state[key] = state[key].to(torch.int8)
    save_file(state, str(f))


def edit_config(sub: str, **changes):
    def apply(ck: Path) -> None:
        import json

        path = ck / sub / "config.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))
    return apply


def empty_folder(sub: str):
    def apply(ck: Path) -> None:
        shutil.rmtree(ck / sub)
        (ck / sub).mkdir()
    return apply


CHECKPOINT_FAULTS = [
    ("int8-weights", corrupt_int8, "is I8; fluxrt takes float weights (F32, F16, BF16, F64, F8_E4M3, F8_E5M2), not integer ones"),
    ("header-list", lambda ck: write_safetensors_header(ck / "vae" / "diffusion_pytorch_model.safetensors", [1, 2]),
     "its header is a JSON list, expected an object of tensors"),
    ("no-offsets", lambda ck: write_safetensors_header(ck / "vae" / "diffusion_pytorch_model.safetensors",
                                                       {"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
     "header entry 'w' is {'dtype': 'F32', 'shape': [2]}, expected dtype, shape and data_offsets"),
    ("bad-span", lambda ck: write_safetensors_header(ck / "vae" / "diffusion_pytorch_model.safetensors",
                                                     {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                                                     b"\0" * 8),
     "tensor 'w' spans 8 bytes, its F32 shape [3] needs 12"),
    ("unknown-key", edit_config("transformer", foo_bar=1),
     "['foo_bar'] is not a parameter of FluxTransformer2DModel"),
    ("not-an-int", edit_config("transformer", num_layers="two"), "num_layers must be an integer, got 'two'"),
    ("empty-tokenizer", empty_folder("tokenizer"), "clip tokenizer"),
    ("foreign-tokenizer", edit_config("text_encoder_2", vocab_size=5000),
     "t5 tokenizer"),
]


@pytest.mark.parametrize("fault, corrupt, message", CHECKPOINT_FAULTS, ids=[c[0] for c in CHECKPOINT_FAULTS])
def test_checkpoint_weights_configs_and_tokenizers_are_checked_before_anything_is_written(
        tiny_checkpoints, tmp_path, fault, corrupt, message):
    ck = shutil.copytree(tiny_checkpoints["dev"], tmp_path / "ck")
    corrupt(ck)
    out = tmp_path / "onnx"
    code, err = cli(["export", ck, "--out", out, "--components", "vae"])
    one_line_error(code, err, message)
    if fault == "empty-tokenizer":
        assert "needs tokenizer.json or vocab.json + merges.txt; found []" in err
    if fault == "foreign-tokenizer":
        assert "has 1000 tokens, but its text encoder embeds 5000: not this model's tokenizer" in err
    assert not out.exists()  # no side files, no lock, no folder


def test_build_options_are_validated_before_anything_is_written(half_exports, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX (fluxrt[trt-rtx]) is not installed")
    base = ["build", half_exports["fp16"], "--library", "tensorrt-rtx"]
    for i, (flags, needle) in enumerate((
            (["--precision", "fp16", "--compute-capability", "SM999"], "--compute-capability: compute capability "
                                                                        "'SM999' is not one of ["),
            (["--precision", "fp16", "--text-length", "1,512,1000"], "text length 1000 exceeds the 512 T5 tokens"),
            (["--precision", "fp8", "--calibration-prompts", "100"], "--calibration-prompts is 100, but the bundled "
                                                                     "prompts hold only"))):
        out = tmp_path / f"e{i}"
        start = time.perf_counter()
        code, err = cli(base + ["--out", out, *flags])
        one_line_error(code, err, needle)
        assert not out.exists() and time.perf_counter() - start < 30


def test_messages_name_the_flags_of_the_command(fp32_exports, half_exports, tmp_path):
    base = ["generate", "--onnx", fp32_exports["dev"], "--prompt", "a", "--out", tmp_path / "x.png"]
    for flags, needle in ((["--steps", "0"], "--steps must be an integer in [1, 1000], got 0"),
                          (["--height", "70"], "--height must be a positive multiple of 16 pixels, got 70"),
                          (["--num-images", "0"], "--num-images must be a positive integer, got 0")):
        code, err = cli(base + flags)
        one_line_error(code, err, needle)
    code, err = cli(["build", half_exports["fp16"], "--out", tmp_path / "e", "--precision", "fp16", "--batch", "2,1,1"])
    one_line_error(code, err, "--batch")
    assert "ShapeEnvelope" not in err


def test_side_configs_are_checked_when_read(fp32_exports, tmp_path):
    """A VAE factor that is not a finite number, and a scheduler shift whose schedule is not finite, are refused
    by name before any stage runs."""
    import json

    from fluxrt.errors import ExportError
    from fluxrt.runtime import sampling

    folder = shutil.copytree(fp32_exports["dev"], tmp_path / "onnx")
    vae = folder / "vae" / "config.json"
    original = json.loads(vae.read_text())
    for value in (None, "abc", float("inf")):
        vae.write_text(json.dumps(dict(original, scaling_factor=value)))
        with pytest.raises(ExportError, match=r"vae/config.json: scaling_factor must be a finite non-zero number"):
            FluxPipeline.load(folder)
    config = dict(json.loads((fp32_exports["dev"] / "scheduler" / "scheduler_config.json").read_text()))
    assert config.get("use_dynamic_shifting")
    for changes, tokens in ((dict(max_shift=1000), 4096), ({}, 800 * 800)):  # 1024², and 12800² at FLUX's shift
        with pytest.raises(InvalidInputError, match="gives a schedule that is not finite in float32"):
            sampling.get_sigmas(4, tokens, dict(config, **changes))
    assert np.isfinite(sampling.get_sigmas(4, 4096, config)).all()


def edited_manifest(src: Path, tmp_path: Path, edit) -> Path:
    import json

    folder = shutil.copytree(src, tmp_path / "onnx")
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


MANIFEST_EDITS = [
    ("vae-scale", lambda m: m["dims"].update(vae_scale_factor=4), "dims.vae_scale_factor 4 disagrees with"),
    ("no-sha256", lambda m: m["components"]["clip"]["fingerprint"].pop("sha256"),
     "components.clip.fingerprint must hold 'files' {name: sha256} and 'sha256'"),
    ("outside", lambda m: m["components"]["clip"].update(file="../clip.onnx"),
     "components.clip.file '../clip.onnx' points outside the folder"),
    ("absolute", lambda m: m["components"]["t5"].update(file="/etc/passwd"),
     "components.t5.file '/etc/passwd' points outside the folder"),
    ("unknown-graph", lambda m: m["components"].update(unet=dict(m["components"]["clip"])),
     "components.unet: not one of the graphs"),
    ("precision", lambda m: m["components"]["transformer"].update(precision="fp16"),
     "declares 'hidden_states' as float32, but the folder says float16 (fp16 graph)"),
    ("dims", lambda m: m["dims"].update(clip_hidden_size=64, pooled_projection_dim=64),
     r"declares 'text_embeddings' with shape \['B', 77, 32\], but the folder's dims give \['B', 77, 64\]"),
]


@pytest.mark.parametrize("edit, change, message", MANIFEST_EDITS, ids=[e[0] for e in MANIFEST_EDITS])
def test_an_edited_manifest_is_refused_when_the_folder_is_opened(fp32_exports, tmp_path, edit, change, message):
    """Checked against its schema and the folder when opened, and against the graphs' declared types and sizes
    when they are loaded: before any stage runs."""
    from fluxrt.errors import ExportError

    folder = edited_manifest(fp32_exports["dev"], tmp_path, change)
    pattern = message if edit == "dims" else re.escape(message)
    with pytest.raises((ExportError, EngineError), match=pattern):
        FluxPipeline.load(folder)
    code, err = cli(["generate", "--onnx", folder, "--prompt", "a", *GEN, "--out", tmp_path / "x.png"])
    one_line_error(code, err)
    assert not (tmp_path / "x.png").exists()


def test_outputs_carry_per_stage_timings(fp32_exports):
    out = FluxPipeline.load(fp32_exports["dev"])("a fox", height=64, width=64, num_inference_steps=2, seed=1)
    t = out.timings
    assert set(t) == {"clip", "t5", "transformer", "vae_decoder", "total"}
    assert all(v > 0 for v in t.values())
    assert t["clip"] + t["t5"] + t["transformer"] + t["vae_decoder"] <= t["total"]


@pytest.mark.slow
def test_exports_are_reproducible_whatever_the_hash_seed(tiny_checkpoints, fp32_exports, tmp_path):
    """Item 16: two exports of one checkpoint give the same bytes. torch writes the graphs' symbolic range
    constraints in set order, which follows Python's hash seed; seeds 0 and 1 gave two vae_encoder.onnx."""
    import subprocess
    import sys

    runs = {}
    for seed in ("0", "1"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        runs[seed] = subprocess.Popen(
            [sys.executable, "-c", "import sys; from fluxrt.cli import main; sys.exit(main(sys.argv[1:]))",
             "export", str(tiny_checkpoints["dev"]), "--out", str(tmp_path / seed), "--precision", "fp32",
             "--components", "vae"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for seed, proc in runs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    for name in ("vae_encoder.onnx", "vae_decoder.onnx"):
        reference = (fp32_exports["dev"] / name).read_bytes()
        for seed in runs:
            assert (tmp_path / seed / name).read_bytes() == reference, (name, seed)


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export(tiny_checkpoints, tmp_path):
    """Item 15: an export killed while saving leaves its staging folder (named after its process); the next
    export into the folder, holding the folder's lock, removes it."""
    out = tmp_path / "onnx"
    stale = out / ".staging-transformer-4194301"
    stale.mkdir(parents=True)
    (stale / "transformer.onnx").write_bytes(b"half a graph")
    code, stderr = cli(["export", tiny_checkpoints["dev"], "--out", out, "--components", "clip"])
    assert code == 0, stderr
    assert not stale.exists() and ExportFolder.open(out).record("clip")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".export.lock"]


def foreign_lines(stderr: str) -> list[str]:
    """Lines that are not fluxrt's own progress, warnings or errors (progress redraws with carriage returns)."""
    lines = [part for line in stderr.splitlines() for part in line.split("\r") if part.strip()]
    return [line for line in lines if not line.startswith(("[fluxrt ", "fluxrt "))]


def test_successful_runs_print_only_fluxrt_progress_and_one_line_warnings(half_exports, fp32_exports, tmp_path):
    """Newcomer: a good run prints fluxrt's progress and nothing alarming -- no transformers notices or shard
    progress bars (tiny-model), no ModelOpt NVML ERROR or onnx-graphsurgeon notes (an FP8 build), and a
    warning (an over-long prompt) as one line without Python's source line. (The three runs are independent
    and run at once, each in its own process.)"""
    from child_process import Child

    with Child(FLUXRT, "tiny-model", tmp_path / "tiny", "--variant", "schnell") as tiny_model, \
            Child(FLUXRT, "build", half_exports["fp16"], "--out", tmp_path / "eng", "--precision", "fp8",
                  "--components", "transformer", "--calibration-prompts", "1", "--calibration-steps", "1",
                  "--calibration-size", "32", "--calibration-text-length", "16", "--library", "tensorrt-rtx") as fp8, \
            Child(FLUXRT, "generate", "--onnx", fp32_exports["dev"], "--prompt", "word " * 100,
                  "--out", tmp_path / "a.png", *GEN) as generation:
        tiny, build, generate = [p.finish(timeout=600) for p in (tiny_model, fp8, generation)]
    code, out, err = tiny
    assert code == 0 and "wrote tiny FLUX.1-schnell" in out and not foreign_lines(err), err
    code, out, err = build
    assert code == 0 and (tmp_path / "eng" / "transformer.plan").is_file(), err
    assert "[fluxrt fp8] transformer: sampling 1 prompts" in err and not foreign_lines(err), foreign_lines(err)
    code, out, err = generate
    assert code == 0 and not foreign_lines(err), err
    warning = [line for line in err.splitlines() if "warning:" in line]
    assert [w[:48] for w in warning] == ["fluxrt generate: warning: clip prompt 0 has 202 ",
                                         "fluxrt generate: warning: t5 prompt 0 has 201 to"], err
    assert "pipeline.py" not in err and "warnings.warn" not in err


def test_calibration_prompts_help_states_the_bundled_count():
    """--help gives --calibration-prompts' range without importing the engines at start-up: the number it
    states is the bundled file's."""
    from fluxrt.cli import parser
    from fluxrt.engines.fp8 import bundled_prompts

    helps = [a.help for a in parser()._subparsers._group_actions[0].choices["quantize"]._actions
             if "--calibration-prompts" in a.option_strings]
    assert helps and f"the {len(bundled_prompts())} of engines/calibration_prompts.txt" in helps[0]
