"""fluxrt bench on the tiny model: the report's structure, its arithmetic and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fluxrt.bench import pipelines as bench


def test_flop_count_of_full_flux_dev():
    # 19 double + 38 single blocks of width 3072 at 1024x1024 (4096 image tokens) with 512 text tokens:
    # 57 x (24 L D^2 + 4 L^2 D) with L = 4608 is 74.36 TFLOP; embedders and final layer add 0.02%
    flops = bench.transformer_flops(1, 4096, 512, 19, 38)
    blocks = 57 * (24 * 4608 * 3072**2 + 4 * 4608**2 * 3072)
    assert blocks == pytest.approx(7.436e13, rel=1e-3)
    assert flops == pytest.approx(blocks, rel=2e-3) and flops > blocks
    assert bench.transformer_flops(2, 4096, 512, 19, 38) == pytest.approx(2 * flops)


def test_summary_and_quality():
    s = bench.summarize([0.001 * i for i in range(1, 101)])
    assert s["runs"] == 100 and s["p50_ms"] == pytest.approx(50.5) and s["p99_ms"] == pytest.approx(99.01)
    a = np.zeros((1, 4, 4, 3))
    b = a + 0.1
    q = bench.image_quality(b, a)
    assert q["max_abs"] == pytest.approx(0.1) and q["psnr_db"] == pytest.approx(20.0)
    assert bench.image_quality(a, a)["psnr_db"] == float("inf")


@pytest.mark.parametrize("case", ["noise", "blur", "shift", "contrast", "batch"])
def test_ssim_equals_scikit_image(case):
    """SSIM as scikit-image computes it (Gaussian window, sigma 1.5, population covariances, per channel), on
    natural-ish images and the distortions FP8 and fp16 cause (noise, smoothing, an offset, a contrast change)."""
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:48, 0:40] / 40.0
    ref = np.stack([np.sin(6 * x + 2 * y) * 0.4 + 0.5, x * y, np.cos(9 * y) * 0.3 + 0.5], axis=-1)
    ref = np.clip(ref + rng.normal(0, 0.03, ref.shape), 0, 1)
    other = {"noise": lambda r: np.clip(r + rng.normal(0, 0.05, r.shape), 0, 1),
             "blur": lambda r: (r + np.roll(r, 1, 0) + np.roll(r, 1, 1)) / 3,
             "shift": lambda r: np.clip(r + 0.1, 0, 1), "contrast": lambda r: 0.5 + 0.7 * (r - 0.5),
             "batch": lambda r: np.clip(r + rng.normal(0, 0.02, r.shape), 0, 1)}[case](ref)
    if case == "batch":  # [B, H, W, C]: the mean over images of each image's SSIM
        a, b = np.stack([other, ref]), np.stack([ref, ref])
        want = np.mean([metrics.structural_similarity(u, v, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                                      use_sample_covariance=False, data_range=1.0)
                        for u, v in zip(a, b)])
    else:
        a, b = other, ref
        want = metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False, data_range=1.0)
    got = bench.ssim(a, b)
    assert got == pytest.approx(want, abs=1e-9)
    assert 0 < got < 1 and bench.ssim(ref, ref) == pytest.approx(1.0)
    assert bench.image_quality(a, b)["ssim"] == pytest.approx(want, abs=1e-9)


def test_ssim_refuses_mismatched_images():
    with pytest.raises(ValueError, match=r"ssim needs two image arrays \[..., H, W, C\] of one shape, got \(4, 4, 3\) "
                                         r"and \(4, 5, 3\)"):
        bench.ssim(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))


def test_time_call_excludes_warmup_and_syncs():
    calls, syncs = [], []
    samples = bench.time_call(lambda: calls.append(1), warmup=3, iters=5, sync=lambda: syncs.append(1))
    assert len(calls) == 8 and len(samples) == 5 and len(syncs) == 6


def test_bench_cli_writes_json_markdown_and_chart(fp32_exports, tmp_path, capsys):
    """fluxrt bench's entry point, called here (its process-level errors: test_bench_cli_errors)."""
    from fluxrt.cli import main

    out = tmp_path / "bench"
    code = main(["bench", "--run", f"ort={fp32_exports['dev']}:ort-cpu", "--run", f"torch={fp32_exports['dev']}:torch",
                 "--out", str(out), "--height", "32", "--width", "48", "--steps", "2", "--text-length", "16",
                 "--iters", "3", "--warmup", "1"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "bench.json").read_text())
    assert [run["label"] for run in report["runs"]] == ["ort", "torch"]
    for run in report["runs"]:
        assert set(run["stages"]) == {"clip", "t5", "transformer_step", "denoise_loop", "vae_decode", "generation"}
        for stats in run["stages"].values():
            assert stats["runs"] == 3 and 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
        assert run["transformer_tflops"] > 0 and run["images_per_second"] > 0
    # same fp32 weights through torch and ONNX Runtime: the same image within float rounding
    assert report["runs"][1]["quality"]["max_abs"] < 2e-4 and report["runs"][1]["quality_vs"] == "ort"
    assert "| config | backend |" in (out / "bench.md").read_text()
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fluxrt.cli", "bench", "--run", "nocolon", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--run must be LABEL=FOLDER:BACKEND" in r.stderr and "Traceback" not in r.stderr


def test_kernel_classes_and_report_rows():
    """CUPTI kernel names as torch, Triton and ONNX Runtime emit them land in the right class; the
    report's kernel table carries each class's time."""
    from fluxrt.bench.synthetic import KERNEL_COLUMNS, kernel_class, kernel_rows, ort_label

    names = {
        "nvjet_sm90_hsh_192x192_64x3_2x1_v_bz_coopB_NNN": "gemm",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7": "attention",
        "triton_poi_fused_cat_gelu_permute_view_19": "triton",
        "void onnxruntime::cuda::cuApplyLayerNorm<__half, float, __half, true>(": "norm",
        "void onnxruntime::contrib::cuda::RotaryEmbeddingBSNH<__half, false>(": "rotary",
        "void onnxruntime::cuda::FastGeluKernel2<256u>(": "gelu",
        "void onnxruntime::cuda::_UnaryElementWise<__half, float, onnxruntime::cuda::OP_Cast<": "cast",
        "void onnxruntime::cuda::_ConcatKernelInputMajor<short>(": "copy",
        "void onnxruntime::cuda::_BinaryElementWiseRhsPerChannelBatchN<__half, __half, __half, OP_Add": "elementwise",
        "void onnxruntime::cuda::_Clip<__half>(": "other",
    }
    assert {n: kernel_class(n) for n in names} == names
    assert ort_label(("MatMulAddFusion",)) == "ort-cuda"
    assert ort_label(()) == "ort-cuda/all-optimizers"
    assert ort_label(("MatMulAddFusion", "GeluFusion")) == "ort-cuda/no-MatMulAddFusion+GeluFusion"
    m = dict(component="transformer", layers=[1, 2], backend="ort-cuda", precision="fp16", p50_ms=9.4,
             kernels={"gpu_ms": 8.5, "by_class_ms": {"gemm": 4.5, "rotary": 0.5}})
    (row,) = kernel_rows([m, dict(m, kernels=None)])
    assert row["layers"] == "1+2" and row["gpu"] == 8.5 and row["gemm"] == 4.5 and row["rotary"] == 0.5
    assert all(c in row for c in KERNEL_COLUMNS) and row["attention"] == 0.0


@pytest.mark.slow
def test_synthetic_vae_follows_the_exporters_precision_rule(tmp_path, monkeypatch):
    """bench-synthetic times the graphs the exporter would write: a half-precision export keeps the VAE in
    fp32 (fluxrt.components.component_precision), so its VAE rows run an fp32 graph."""
    from fluxrt.bench import synthetic

    monkeypatch.setenv("FLUXRT_BENCH_WORK", str(tmp_path / "work"))
    synthetic.use_model("tiny")
    try:
        data = synthetic.run(tmp_path / "out", [("vae", None)], synthetic.Shape(1, 32, 32, 8), ["bf16"], ["ort"],
                             warmup=0, iters=1, device="cpu", optimize="")
    finally:
        synthetic.use_model("flux-dev")
    rows = [m for m in data["measurements"] if "p50_ms" in m]
    assert [(m["precision"], m["graph_precision"]) for m in rows] == [("bf16", "fp32")], data
    assert json.loads((tmp_path / "out" / "results.json").read_text())["measurements"] == data["measurements"]


def test_synthetic_times_the_fp8_kernels_transformer_over_a_reused_export(tmp_path, monkeypatch, ops_library):
    """--export-only then --reuse-exports (two calls on the GPU machine): the second call times the exported
    ort-kernels graph without exporting again, and its FP8 rewrite (on the CPU over the fp32 graph) with its
    distance from that source."""
    from fluxrt.bench import synthetic

    monkeypatch.setenv("FLUXRT_BENCH_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("FLUXRT_ORT_OPS", str(ops_library))
    synthetic.use_model("tiny")
    shape, plan = synthetic.Shape(1, 64, 64, 16), [("transformer", (1, 2))]
    try:
        first = synthetic.run(tmp_path / "a", plan, shape, ["fp32"], ["ort"], warmup=0, iters=1, attention="ort-kernels",
                              device="cpu", optimize="", export_only=True)
        graph = tmp_path / "work" / "transformer[1+2]-ort-kernels-fp32" / "transformer.onnx"
        stamp = graph.stat().st_mtime_ns
        data = synthetic.run(tmp_path / "b", plan, shape, ["fp32", "fp8"], ["ort"], warmup=0, iters=1,
                             attention="ort-kernels", device="cpu", optimize="", reuse=True)
    finally:
        synthetic.use_model("flux-dev")
    assert "p50_ms" not in first["measurements"][0] and first["measurements"][0]["export"]["export_seconds"] > 0
    assert graph.stat().st_mtime_ns == stamp  # reused, not exported again
    base, fp8 = data["measurements"]
    assert base["precision"] == "fp32" and fp8["precision"] == "fp8" and fp8["graph_precision"] == "fp32"
    assert fp8["export"]["fp8"]["fp8_linears"] == 1 * 12 + 2 * 6
    assert 1e-4 < fp8["vs_bf16_rel_rms"] < 0.1  # FP8's own error: quantized, and close
