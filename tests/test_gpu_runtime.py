"""The runtime on ONNX Runtime CUDA (device-resident loop, I/O binding): runs where a CUDA GPU,
cupy and onnxruntime-gpu exist, skipped with that reason elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

from fluxrt.runtime import FluxPipeline

pytestmark = pytest.mark.gpu


def require_cupy_gpu():
    """cupy with a CUDA device, or a skip saying what is missing."""
    cupy = pytest.importorskip("cupy", reason="cupy is not installed: no GPU backend here")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA driver")
    return cupy


def require_ort_cuda():
    require_cupy_gpu()
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install fluxrt[ort-gpu])")
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


@pytest.fixture(scope="module")
def exports(tiny_checkpoints, fp32_exports, tmp_path_factory):
    require_ort_cuda()
    from fluxrt.export.checkpoint import Checkpoint
    from fluxrt.export.onnx_export import ExportRequest, export_checkpoint

    root = tmp_path_factory.mktemp("gpu")
    out = {"fp32": fp32_exports["dev"]}
    for precision in ("fp16", "bf16"):
        export_checkpoint(Checkpoint.open(tiny_checkpoints["dev"]), root / precision,
                          ExportRequest(("clip", "t5", "transformer", "vae"), precision))
        out[precision] = root / precision
    for precision in ("fp32", "fp16", "bf16"):  # the fused ONNX Runtime transformer (--attention ort)
        export_checkpoint(Checkpoint.open(tiny_checkpoints["dev"]), root / f"ort-{precision}",
                          ExportRequest(("clip", "t5", "transformer", "vae"), precision, attention="ort"))
        out[f"ort-{precision}"] = root / f"ort-{precision}"
    return out


ARGS = dict(prompt=["a red fox in the snow", "a lighthouse"], height=48, width=80, num_inference_steps=4,
            max_sequence_length=24, output_type="np", num_images_per_prompt=2)


def latents() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((4, 15, 64)).astype(np.float32)


def test_ort_cuda_equals_ort_cpu_fp32(exports):
    cpu = FluxPipeline.load(exports["fp32"], backend="ort-cpu")(**ARGS, latents=latents()).images
    gpu = FluxPipeline.load(exports["fp32"], backend="ort-cuda")(**ARGS, latents=latents()).images
    assert np.abs(cpu - gpu).max() < 1e-3  # TF32-free fp32 kernels: reordering only


@pytest.mark.parametrize("precision,bound", [("fp16", 0.03), ("bf16", 0.08)])
def test_ort_cuda_half_precision_close_to_fp32(exports, precision, bound):
    want = FluxPipeline.load(exports["fp32"], backend="ort-cpu")(**ARGS, latents=latents()).images
    got = FluxPipeline.load(exports[precision], backend="ort-cuda")(**ARGS, latents=latents()).images
    assert np.isfinite(got).all()
    assert np.abs(got - want).mean() < bound / 4 and np.abs(got - want).max() < 4 * bound


def test_mixed_cpu_and_cuda(exports):
    mixed = FluxPipeline.load(exports["fp32"], backend={"clip": "ort-cpu", "t5": "ort-cuda",
                                                         "transformer": "ort-cuda", "vae_decoder": "ort-cpu"})
    want = FluxPipeline.load(exports["fp32"], backend="ort-cpu")(**ARGS, latents=latents()).images
    assert np.abs(mixed(**ARGS, latents=latents()).images - want).max() < 1e-3


def test_fused_transformer_on_ort_cuda_equals_portable_on_cpu(exports):
    """RotaryEmbedding, SimplifiedLayerNormalization, the [B, 1, C]-broadcast LayerNormalization and
    MultiHeadAttention on CUDA compute what the standard-op graph computes on the CPU."""
    want = FluxPipeline.load(exports["fp32"], backend="ort-cpu")(**ARGS, latents=latents()).images
    got = FluxPipeline.load(exports["ort-fp32"], backend="ort-cuda")(**ARGS, latents=latents()).images
    assert np.abs(got - want).max() < 1e-3


@pytest.mark.parametrize("precision,bound", [("fp16", 0.03), ("bf16", 0.08)])
def test_fused_transformer_half_precision_close_to_fp32(exports, precision, bound):
    want = FluxPipeline.load(exports["fp32"], backend="ort-cpu")(**ARGS, latents=latents()).images
    got = FluxPipeline.load(exports[f"ort-{precision}"], backend="ort-cuda")(**ARGS, latents=latents()).images
    assert np.isfinite(got).all()
    assert np.abs(got - want).mean() < bound / 4 and np.abs(got - want).max() < 4 * bound


def test_ort_cuda_sessions_skip_matmul_add_fusion(exports):
    from fluxrt.runtime.ort import ORT_CUDA_DISABLED_OPTIMIZERS

    pipe = FluxPipeline.load(exports["ort-fp16"], backend="ort-cuda")
    runner = pipe.runners["transformer"]
    assert runner.disabled_optimizers == ORT_CUDA_DISABLED_OPTIMIZERS == ("MatMulAddFusion",)


@pytest.fixture(scope="module")
def fused_fp16(tiny_checkpoints, tmp_path_factory):
    require_ort_cuda()
    from fluxrt.export.checkpoint import Checkpoint
    from fluxrt.export.onnx_export import ExportRequest, export_checkpoint

    out = tmp_path_factory.mktemp("graph") / "ort-fp16"
    export_checkpoint(Checkpoint.open(tiny_checkpoints["dev"]), out,
                      ExportRequest(("clip", "t5", "transformer", "vae"), "fp16", attention="ort"))
    return out


def test_cuda_graph_pipeline_replays_one_graph_per_shape(fused_fp16):
    """The transformer replayed from CUDA graphs (one per shape, ONNX Runtime's gpu_graph_id) gives
    the images of plain ort-cuda, for two shapes in turn and back."""
    plain = FluxPipeline.load(fused_fp16, backend="ort-cuda")
    graphed = FluxPipeline.load(fused_fp16, backend="ort-cuda", cuda_graph=True)
    small = dict(ARGS, height=32, width=32, num_images_per_prompt=1)
    small_latents = np.random.default_rng(1).standard_normal((2, 4, 64)).astype(np.float32)
    for args, lat in ((ARGS, latents()), (small, small_latents), (ARGS, latents())):
        want = plain(**args, latents=lat).images
        got = graphed(**args, latents=lat).images
        assert np.abs(got - want).max() < 1e-3
    assert len(graphed.runners["transformer"]._graph_io) == 2


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_bf16_inputs_from_the_host_give_the_numbers_they_hold(exports, cuda_graph):
    """The loop fed host float32 embeddings (cast to numpy bfloat16 on the way in) computes what it computes
    from the device arrays of the pipeline's own encoders: a host bfloat16 array reaches the graph as its bits,
    not as a cupy bfloat16 array cast by value into the runner's uint16 buffers (the H200 run of 2026-12-02
    measured a relative error of ~1.0 that way)."""
    import cupy

    from fluxrt import dtypes
    from fluxrt.runtime import loop, sampling

    pipe = FluxPipeline.load(exports["bf16"], backend="ort-cuda", cuda_graph=cuda_graph)
    transformer = pipe.runners["transformer"]
    pooled, text = pipe.encode_prompts(["a red fox in the snow"], 24)
    assert dtypes.is_bf16_bits(text)
    x = latents()[:1]
    sigmas = sampling.get_sigmas(2, x.shape[1], pipe.scheduler_config)
    ids = sampling.image_ids(48, 80, pipe.dims.vae_scale_factor)
    want = cupy.asnumpy(loop.denoise(transformer, x, pooled, text, ids, sigmas, 3.5))
    host = [cupy.asnumpy(dtypes.to_float32(a)) for a in (pooled, text)]
    got = cupy.asnumpy(loop.denoise(transformer, x, *host, ids, sigmas, 3.5))
    assert np.array_equal(got, want)  # the same bf16 values in: the same numbers out
    as_numpy_bf16 = [a.astype(dtypes.numpy_dtype("bfloat16")) for a in host]
    assert np.array_equal(cupy.asnumpy(loop.denoise(transformer, x, *as_numpy_bf16, ids, sigmas, 3.5)), want)


@pytest.mark.parametrize("vel, inp", [("uint16", "bfloat16"), ("float16", "float16"), ("float32", "float32"),
                                      ("float32", "bfloat16")])
def test_fused_euler_step_equals_the_array_operations(vel, inp):
    """The loop's one kernel per step on a GPU (runtime/loop.py fused_step) against the array operations it
    replaces, run by numpy on the host: the same float32 latents and the same next input, bit for bit; a NaN or
    an Inf in the velocity raises its flag. Needs cupy and a GPU only."""
    cupy = require_cupy_gpu()
    from fluxrt import dtypes
    from fluxrt.runtime import loop, sampling

    g = np.random.default_rng(0)
    latents = (g.standard_normal((2, 257, 64)) * 3).astype(np.float32)
    v32 = (g.standard_normal((2, 257, 64)) * 2).astype(np.float32)
    host_v = v32.astype(dtypes.numpy_dtype("bfloat16")) if vel == "uint16" else v32.astype(vel)
    device_v = cupy.asarray(host_v.view(np.uint16) if vel == "uint16" else host_v)
    sigma, sigma_next = np.float32(0.71), np.float32(0.6383)
    want = sampling.euler_step(latents, host_v.astype(np.float32), float(sigma), float(sigma_next))
    want_input = dtypes.cast(want, inp)
    got, got_input, flag = loop.fused_step(device_v, cupy.asarray(latents), sigma_next - sigma, inp)
    np.testing.assert_array_equal(cupy.asnumpy(got), want)
    np.testing.assert_array_equal(cupy.asnumpy(got_input),
                                  want_input.view(np.uint16) if inp == "bfloat16" else want_input)
    assert int(flag.get()[0]) == 0
    for bad in (np.nan, np.inf):
        v = host_v.copy()
        v.reshape(-1)[1234] = bad
        _, _, flag = loop.fused_step(cupy.asarray(v.view(np.uint16) if vel == "uint16" else v),
                                     cupy.asarray(latents), sigma_next - sigma, inp)
        assert int(flag.get()[0]) != 0


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_device_bf16_bits_cast_by_value(dtype):
    """A device array of bfloat16 bits (a bf16 T5's or CLIP's output on ORT CUDA) cast for a runner that takes
    another dtype (an fp16 transformer beside bf16 text encoders) gives the numbers the bits stand for, as the
    host's bfloat16 array does: the ninth H200 run cast the bits as integers (up to 65535, Inf in fp16) and the
    fp16 transformer's first call gave NaN. Needs cupy and a GPU only."""
    cupy = require_cupy_gpu()
    from fluxrt import dtypes

    host = (np.random.default_rng(1).standard_normal((3, 77, 64)) * 5).astype(dtypes.numpy_dtype("bfloat16"))
    device = dtypes.to_cupy(host)  # uint16 bits
    got = cupy.asnumpy(dtypes.cast(device, dtype))
    want = dtypes.cast(host, dtype)
    if dtype == "bfloat16":
        np.testing.assert_array_equal(got, want.view(np.uint16))
    else:
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, want)
        assert float(np.abs(got).max()) < 100  # numbers of order 5, not bit patterns of order 16000-65535
