"""The full-size end-to-end benchmark (bench/full.py), run whole on the tiny architecture on the CPU: a checkpoint
folder without weights whose modules are seeded on demand, exported by fluxrt's exporter, quantized by fluxrt
quantize, and timed beside diffusers' FluxPipeline over the same weights. diffusers is the reference: its
images and every step's transformer output equal fluxrt's fp32 ones; FP8 differs by FP8's error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fluxrt.bench import full
from fluxrt.errors import InvalidInputError
from fluxrt.runtime import ort_ops

SETTINGS = full.RunSettings(height=64, width=64, steps=3, text_length=16, warmup=1, iters=2, generation_warmup=1,
                            generation_iters=1)
LORA_SETTINGS = full.RunSettings(**{**SETTINGS.__dict__, "lora_rank": 4})


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory, ops_library):
    from fluxrt.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ort_ops.ENV_LIBRARY, str(ops_library))
        root = tmp_path_factory.mktemp("bench-full")
        full.prepare(root, "tiny")
        full.export(root, "fp32", device="cpu")
        assert main(["quantize", str(root / "onnx-fp32"), "--out", str(root / "onnx-fp8"), "--calibration-prompts",
                     "1", "--calibration-steps", "1", "--calibration-size", "64",
                     "--calibration-text-length", "16"]) == 0
        data = full.run(root, root / "out", ["fp32", "fp8"], ["eager"], LORA_SETTINGS, device="cpu")
        yield root, data


def rows_of(data, label):
    return {r["component"]: r for r in data["rows"] if r["label"] == label}


def test_every_stage_of_every_configuration_is_a_row(bench_root):
    root, data = bench_root
    assert [r["label"] for r in data["rows"]] == [label for label in ("fluxrt fp32", "fluxrt fp8", "torch eager")
                                                  for _ in range(5)]
    for label, backend, precision in (("fluxrt fp32", "ort-cpu+kernels", "fp32"), ("fluxrt fp8", "ort-cpu+kernels", "fp8"),
                                      ("torch eager", "torch-eager", "fp32")):
        rows = rows_of(data, label)
        assert sorted(rows) == ["clip", "generation", "t5", "transformer", "vae_decoder"]
        for component, r in rows.items():
            assert r["backend"] == backend and r["precision"] == precision and r["gpu"] is None
            assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
            assert r["layers"] == ([2, 2] if component in ("transformer", "generation") else None)
        assert rows["generation"]["steps"] == 3 and rows["generation"]["image_std"] > 0.05  # not a flat image
        gen = rows["generation"]
        if label.startswith("fluxrt"):  # the loop's own host time: positive, a small part of a step
            assert 0 < gen["loop_host_ms_per_step"] < 0.5 * rows["transformer"]["p50_ms"]
            assert gen["loop_host_fraction"] == pytest.approx(gen["loop_host_ms_per_step"] / rows["transformer"]["p50_ms"])
        else:
            assert "loop_host_ms_per_step" not in gen
    saved = json.loads((root / "out" / "results.json").read_text())
    assert saved["rows"] == data["rows"] and saved["settings"]["steps"] == 3
    assert sorted(saved["exports"]) == ["fp32", "fp8"]
    assert saved["exports"]["fp8"]["transformer"]["quantized_linears"] == 2 * 12 + 2 * 6
    assert saved["exports"]["fp32"]["transformer"]["export_seconds"] > 0
    for name in ("results.md", "stages.png", "images.png"):
        assert (root / "out" / name).stat().st_size > 0
    text = (root / "out" / "results.md").read_text()
    assert "loop host ms/step" in text
    assert "| fluxrt fp8 | fluxrt fp32 |" in text and "| onnx-fp8 | transformer | fp32 |" in text


def test_a_lora_is_swapped_into_each_fluxrt_configuration_and_out(bench_root):
    """--lora-rank: the seeded LoRA (every attention linear: 8 per double block, 3 per single) is loaded into each
    fluxrt configuration's pipeline, timed, and unloaded, after which the base image comes back bit for bit; the
    LoRA moves the image (measured 32.5 dB from the base, max difference 0.15), FP8 with the LoRA stays near fp32
    with it (measured 44.2 dB); the file is a real peft-layout LoRA: diffusers' load_lora_weights on the same
    modules gives fluxrt fp32's LoRA image (measured max difference 2.7e-5)."""
    from fluxrt.runtime.pipeline import FluxPipeline

    root, data = bench_root
    lora_file = root / "lora-r4.safetensors"
    for label in ("fluxrt fp32", "fluxrt fp8"):
        lo = rows_of(data, label)["generation"]["lora"]
        assert lo["path"] == str(lora_file) and lo["rank"] == 4 and lo["targets"] == 2 * 8 + 2 * 3
        assert lo["parameters"] == 22 * 2 * 4 * 64 and lo["bytes"] > lo["parameters"] * 2
        assert lo["load_s"] > 0 and lo["first_generation_s"] > 0 and lo["generation_s"] > 0 and lo["unload_s"] > 0
        assert lo["base_restored"] is True
        assert 20 < lo["image_vs_base"]["psnr_db"] < 38
    fp32, fp8 = (rows_of(data, f"fluxrt {p}")["generation"]["lora"] for p in ("fp32", "fp8"))
    assert "image" not in fp32 and fp8["vs"] == "fluxrt fp32" and 35 < fp8["image"]["psnr_db"] < 80
    text = (root / "out" / "results.md").read_text()
    assert "## LoRA swapped in and out" in text and "| fluxrt fp8 | 4 | 22 |" in text

    s = LORA_SETTINGS
    pipe = FluxPipeline.load(root / "onnx-fp32", backend="ort-cpu")
    p = pipe.params(s.prompt, s.height, s.width, s.steps, s.guidance, s.text_length, 1, s.seed)
    latents = pipe.initial_latents(p)
    pipe.load_lora(lora_file)
    ours = pipe(s.prompt, height=s.height, width=s.width, num_inference_steps=s.steps, guidance_scale=s.guidance,
                max_sequence_length=s.text_length, latents=latents, output_type="np").images
    ckpt = full.RandomCheckpoint.open_random(root / full.CHECKPOINT, seed=0, device="cpu")
    ref = full.torch_pipeline(ckpt, torch.float32)
    ref.load_lora_weights(str(lora_file))
    with torch.inference_mode():
        theirs = ref(prompt=[s.prompt], height=s.height, width=s.width, num_inference_steps=s.steps,
                     guidance_scale=s.guidance, max_sequence_length=s.text_length,
                     latents=torch.from_numpy(latents), output_type="np").images
    assert np.abs(ours - theirs).max() < 1e-4


def test_diffusers_over_the_same_weights_gives_fluxrts_numbers(bench_root):
    """The random checkpoint's modules are the ones fluxrt exported: diffusers' FluxPipeline on them gives, step by
    step, the fp32 graphs' velocity (measured 2e-5 relative RMS) and the same image (measured max 3e-5)."""
    _, data = bench_root
    torch_gen = rows_of(data, "torch eager")["generation"]
    assert torch_gen["vs"] == "fluxrt fp32"
    assert len(torch_gen["per_step_rel_rms"]) == 3 and max(torch_gen["per_step_rel_rms"]) < 1e-3
    assert torch_gen["image"]["max_abs"] < 2e-4 and torch_gen["image"]["ssim"] > 0.9999


def test_fp8_moves_the_numbers_by_fp8s_error(bench_root):
    """Per step, the FP8 transformer's velocity on the reference's own latents (measured 3-4% relative RMS), and
    the FP8 image of its own whole run (measured PSNR 44 dB, SSIM 0.999)."""
    _, data = bench_root
    gen = rows_of(data, "fluxrt fp8")["generation"]
    assert gen["vs"] == "fluxrt fp32" and len(gen["per_step_rel_rms"]) == 3
    assert all(1e-3 < e < 0.1 for e in gen["per_step_rel_rms"])
    assert 30 < gen["image"]["psnr_db"] < 80 and 0.99 < gen["image"]["ssim"] < 1


def test_random_checkpoint_is_seeded_and_fingerprinted(bench_root):
    """One seed, one set of weights in every dtype (rounded from the same float32 draws); another seed, other
    weights and another fingerprint, which the export's manifest records."""
    root, _ = bench_root
    a = full.RandomCheckpoint.open_random(root / full.CHECKPOINT, seed=0)
    b = full.RandomCheckpoint.open_random(root / full.CHECKPOINT, seed=1)
    w32 = a.load_transformer(torch.float32).state_dict()
    w16 = a.load_transformer(torch.bfloat16).state_dict()
    assert all(torch.equal(w32[k].to(torch.bfloat16), w16[k]) for k in w32)
    assert torch.equal(w32["x_embedder.weight"], a.load_transformer(torch.float32).state_dict()["x_embedder.weight"])
    assert not torch.equal(w32["x_embedder.weight"], b.load_transformer(torch.float32).state_dict()["x_embedder.weight"])
    std = w32["transformer_blocks.0.ff.net.2.weight"].std().item()
    assert std == pytest.approx(1 / np.sqrt(w32["transformer_blocks.0.ff.net.2.weight"].shape[1]), rel=0.05)
    assert a.fingerprint() != b.fingerprint()
    manifest = json.loads((root / "onnx-fp32" / "manifest.json").read_text())
    assert manifest["source"]["fingerprint"] == a.fingerprint()
    clip = a.load_clip(torch.float32)
    assert torch.equal(clip.get_buffer("embeddings.position_ids" if hasattr(clip, "embeddings") else "text_model.embeddings.position_ids"), torch.arange(77).unsqueeze(0))


@pytest.mark.parametrize("change, message", [
    (dict(precisions=["fp4"]), r"--precisions fp4: each once, from \['fp32', 'fp16', 'bf16', 'fp8'\]"),
    (dict(precisions=["fp32", "fp32"]), r"--precisions fp32,fp32: each once"),
    (dict(precisions=["bf16"]), r"--precisions bf16: .*onnx-bf16 holds no export \(run `export .* --precision bf16`"),
    (dict(torch_modes=["jit"]), r"--torch jit: each must be one of \['eager', 'compile', 'compile-emulate', 'compile-regional', "
                                   r"'torchao-fp8', 'torchao-fp8-regional'\]"),
    (dict(torch_modes=["torchao-fp8"]), r"--torch torchao-fp8 runs on --device cuda, alone of \['torchao-fp8', "
                                        r"'torchao-fp8-regional'\] and last"),
    (dict(torch_modes=["torchao-fp8-regional", "eager"]), r"--torch torchao-fp8-regional runs on --device cuda"),
    (dict(precisions=[], torch_modes=[]), r"nothing to run: give --precisions and/or --torch"),
])
def test_run_refuses_bad_flags_before_loading_anything(bench_root, tmp_path, change, message):
    root, _ = bench_root
    args = dict(precisions=["fp32"], torch_modes=[])
    args.update(change)
    with pytest.raises(InvalidInputError, match=message):
        full.run(root, tmp_path / "out", args["precisions"], args["torch_modes"], SETTINGS, device="cpu")
    assert not (tmp_path / "out").exists()


def test_cli_errors_name_the_flag(bench_root, tmp_path, capsys):
    root, _ = bench_root
    (tmp_path / "file").write_text("x")
    assert full.main(["run", str(root), "--out", str(tmp_path / "file"), "--precisions", "fp32", "--torch", "",
                      "--device", "cpu"]) == 2
    assert f"--out {tmp_path / 'file'} is not a folder" in capsys.readouterr().err
    assert full.main(["run", str(root), "--out", str(tmp_path / "o"), "--steps", "0", "--device", "cpu"]) == 2
    assert "--steps must be at least 1, got 0" in capsys.readouterr().err
    assert full.main(["run", str(root), "--out", str(tmp_path / "o"), "--lora-rank", "-1", "--device", "cpu"]) == 2
    assert "--lora-rank must be at least 0, got -1" in capsys.readouterr().err
    assert full.main(["run", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cpu", "--torch", "eager"]) == 2
    assert f"{tmp_path / 'checkpoint'} is not a prepared checkpoint" in capsys.readouterr().err
    assert full.main(["prepare", str(root), "--model", "tiny"]) == 2
    assert "checkpoint already exists: prepare writes a new checkpoint folder" in capsys.readouterr().err


def test_report_shows_the_profiled_kernel_time(bench_root, tmp_path):
    """A transformer row with a CUPTI profile (``--profile N`` on a GPU) gets its kernel split and largest kernels
    in results.md; rows without one leave the section out."""
    root, _ = bench_root
    data = json.loads((root / "out" / "results.json").read_text())
    row = next(r for r in data["rows"] if r["label"] == "fluxrt fp8" and r["component"] == "transformer")
    row["kernels"] = {"gpu_ms": 80.5, "launches": 700, "by_class_ms": {"gemm": 50.25, "attention": 17.5},
                      "top_kernels": [{"name": "nvjet_sm90_fp8_gemm", "ms": 30.0, "calls": 114, "class": "gemm"}]}
    (tmp_path / "results.json").write_text(json.dumps(data))
    full.report(tmp_path / "results.json", tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "GPU kernel time by kind" in text
    assert f"| fluxrt fp8 | {row['p50_ms']:.1f} | 80.5 | 700 | 50.25 | 17.50 |" in text
    assert "| fluxrt fp8 | nvjet_sm90_fp8_gemm | gemm | 30.00 | 114 |" in text
    assert "GPU kernel time by kind" not in (root / "out" / "results.md").read_text()
    with pytest.raises(InvalidInputError, match="--profile must be at least 0, got -1"):
        full.RunSettings(profile=-1)


def test_an_export_of_the_transformer_alone_links_the_rest_from_another(bench_root):
    """``export ROOT --precision fp16 --components transformer --others-from fp32``: the fp16 transformer beside the
    fp32 export's text encoders and VAE as hard links (the same files, no second copy), each graph keeping its
    record; the folder loads and draws; a missing source is refused by its flag."""
    import os

    from fluxrt.artifacts import ExportFolder
    from fluxrt.runtime import FluxPipeline

    root, _ = bench_root
    with pytest.raises(InvalidInputError, match=r"--others-from bf16: .*onnx-bf16 holds no export"):
        full.export(root, "fp16", ("transformer",), device="cpu", others_from="bf16")
    # portable attention: fluxrt's CPU kernels compute in float32 only
    manifest = full.export(root, "fp16", ("transformer",), "portable", device="cpu", others_from="fp32")
    source = ExportFolder.open(root / "onnx-fp32")
    borrowed = sorted(manifest["borrowed"]["components"])
    assert borrowed == sorted(n for n in source.components() if n != "transformer")
    assert {n: r["precision"] for n, r in manifest["components"].items()} == {
        **{n: "fp32" for n in borrowed}, "transformer": "fp16"}
    for name in borrowed:
        for file in manifest["components"][name]["fingerprint"]["files"]:
            assert os.stat(root / "onnx-fp16" / file).st_ino == os.stat(root / "onnx-fp32" / file).st_ino
    images = FluxPipeline.load(root / "onnx-fp16")("a lighthouse", height=64, width=64, num_inference_steps=2,
                                                    max_sequence_length=16, seed=1, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and images.std() > 1e-3


def test_regional_compile_then_eager(bench_root, tmp_path):
    """--torch compile-regional (diffusers' compile_repeated_blocks) on the CPU: its image is fluxrt fp32's (as
    torch eager's is), and the eager mode run after it runs the blocks uncompiled again (the same image as the
    module fixture's eager row). Inductor compiles the tiny blocks on the CPU in ~15 s."""
    root, data = bench_root
    out = full.run(root, tmp_path / "out", ["fp32"], ["compile-regional", "eager"], SETTINGS, device="cpu")
    regional = rows_of(out, "torch compile-regional")["generation"]
    assert regional["vs"] == "fluxrt fp32" and regional["backend"] == "torch-compile-regional"
    assert regional["image"]["max_abs"] < 1e-3 and max(regional["per_step_rel_rms"]) < 1e-3
    eager = rows_of(out, "torch eager")["generation"]
    assert eager["image"]["max_abs"] == rows_of(data, "torch eager")["generation"]["image"]["max_abs"]
