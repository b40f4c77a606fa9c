"""The runtime against diffusers: same schedule, same token ids, same images from the same latents."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from fluxrt.errors import InvalidInputError
from fluxrt.runtime import FluxPipeline, loop, sampling
from fluxrt.runtime.params import GuidanceIgnoredWarning

IMAGE_TOL = 2e-4  # float32 ONNX Runtime vs float32 torch through the whole loop and the VAE, images in [0, 1]
# the trained tiny model's learned weights carry float32's differences further (measured up to 2.02e-4 on a CI
# machine's CPU at 48x80, 4 steps, batch 4; a fifth of an 8-bit level, 1/255, still)
TRAINED_IMAGE_TOL = 8e-4
LATENT_TOL = 1e-4  # float32 ONNX Runtime vs float32 torch, packed latents after the Euler loop


def packed_noise(batch: int, height: int, width: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, (height // 16) * (width // 16), 64, generator=g).numpy()


# (prompts, images per prompt, height, width, steps, max_sequence_length)
CASES = [
    (["a red fox in the snow"], 1, 64, 64, 1, 16),
    (["a lighthouse on a cliff", "two cats under neon lights"], 2, 48, 80, 4, 33),  # non-square, batch 4
    (["an astronaut riding a horse on the moon, digital art"], 1, 96, 64, 7, 128),
]


@pytest.mark.parametrize("variant", ["dev", "schnell", "trained"])
@pytest.mark.parametrize("case", CASES, ids=["1step", "batch-nonsquare", "7steps"])
def test_images_equal_diffusers(variant, case, tiny_checkpoints, fp32_exports):
    from diffusers import FluxPipeline as DiffusersFlux

    prompts, n, height, width, steps, max_len = case
    latents = packed_noise(len(prompts) * n, height, width, seed=steps)
    theirs = DiffusersFlux.from_pretrained(tiny_checkpoints[variant], local_files_only=True)
    want = theirs(prompts, num_images_per_prompt=n, height=height, width=width, num_inference_steps=steps,
                  max_sequence_length=max_len, latents=torch.from_numpy(latents), output_type="np",
                  guidance_scale=2.5).images
    ours = FluxPipeline.load(fp32_exports[variant], backend="ort-cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GuidanceIgnoredWarning)
        got = ours(prompts, num_images_per_prompt=n, height=height, width=width, num_inference_steps=steps,
                   max_sequence_length=max_len, latents=latents, output_type="np",
                   guidance_scale=2.5).images
    assert got.shape == want.shape == (len(prompts) * n, height, width, 3)
    assert np.abs(got - want).max() < (TRAINED_IMAGE_TOL if variant == "trained" else IMAGE_TOL)
    assert want.std() > 1e-3  # the comparison is not between two blank images


@pytest.mark.parametrize("variant", ["dev", "schnell", "trained"])
def test_denoise_and_decode_equal_diffusers_loop(variant, tiny_checkpoints, fp32_exports):
    """The free functions the pipeline, the benchmarks and FP8 calibration share, fed diffusers' own prompt
    embeddings: ``loop.denoise`` ends where diffusers' denoising loop ends (its last step callback), and
    ``loop.decode`` feeds the VAE what diffusers' pipeline feeds ``vae.decode``."""
    from diffusers import FluxPipeline as DiffusersFlux

    theirs = DiffusersFlux.from_pretrained(tiny_checkpoints[variant], local_files_only=True)
    height, width, steps, batch = 48, 80, 3, 2
    latents = packed_noise(batch, height, width, seed=3)
    seen = {}

    def last_step(pipe, i, t, kwargs):
        seen["latents"] = kwargs["latents"].numpy().copy()
        return kwargs

    decode = theirs.vae.decode

    def recording_decode(z, *args, **kwargs):
        seen["vae_input"] = z.numpy().copy()
        return decode(z, *args, **kwargs)

    theirs.vae.decode = recording_decode
    prompts = ["a koi pond at night", "a red bicycle"]
    with torch.no_grad():
        text, pooled, _ = theirs.encode_prompt(prompts, prompt_2=None, max_sequence_length=32)
    guidance = None if variant == "schnell" else 3.0  # the trained model is a dev one
    want = theirs(prompt_embeds=text, pooled_prompt_embeds=pooled, height=height, width=width,
                  num_inference_steps=steps, latents=torch.from_numpy(latents), output_type="np",
                  guidance_scale=guidance or 3.5, callback_on_step_end=last_step).images
    ours = FluxPipeline.load(fp32_exports[variant], backend="ort-cpu")
    sigmas = sampling.get_sigmas(steps, latents.shape[1], ours.scheduler_config)
    img_ids = sampling.image_ids(height, width, ours.dims.vae_scale_factor)
    steps_seen = []
    got = loop.denoise(ours.runners["transformer"], latents, pooled.numpy(), text.numpy(), img_ids, sigmas, guidance,
                       callback=lambda i, n: steps_seen.append((i, n)))
    assert steps_seen == [(1, steps), (2, steps), (3, steps)]
    assert got.dtype == np.float32 and got.shape == latents.shape
    assert np.abs(got - seen["latents"]).max() < LATENT_TOL
    assert np.abs(got - latents).max() > 0.1  # the loop moved the latents
    recorded = {}
    vae = ours.runners["vae_decoder"]
    original = vae.infer
    vae.infer = lambda feed: recorded.update(feed) or original(feed)
    images = loop.decode(vae, got, height, width, ours.dims.vae_scale_factor, ours.scaling_factor, ours.shift_factor)
    assert np.abs(recorded["latent"] - seen["vae_input"]).max() < LATENT_TOL / ours.scaling_factor
    assert np.abs(np.clip(images / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1) - want).max() < IMAGE_TOL


def test_torch_backend_and_mixed_setup(fp32_exports):
    """The torch reference backend (injected from the export side), and T5 and the VAE on torch with the
    rest on ONNX Runtime, give the ORT images; asking the runtime itself for 'torch' says how to get it."""
    from fluxrt.artifacts import ExportFolder
    from fluxrt.export.torch_runner import torch_runners

    latents = packed_noise(1, 64, 48, 0)
    args = dict(prompt="a koi pond", height=64, width=48, num_inference_steps=2, max_sequence_length=24,
                latents=latents, output_type="np")
    folder = ExportFolder.open(fp32_exports["dev"])
    ort_images = FluxPipeline.load(fp32_exports["dev"], backend="ort-cpu")(**args).images
    torch_images = FluxPipeline.load(fp32_exports["dev"], runners=torch_runners(folder))(**args).images
    mixed = FluxPipeline.load(fp32_exports["dev"], backend="ort-cpu",
                              runners=torch_runners(folder, ("t5", "vae_decoder")))
    assert {k: r.backend for k, r in mixed.runners.items()} == {"clip": "ort-cpu", "t5": "torch",
                                                                "transformer": "ort-cpu", "vae_decoder": "torch"}
    assert np.abs(torch_images - ort_images).max() < IMAGE_TOL
    assert np.abs(mixed(**args).images - ort_images).max() < IMAGE_TOL
    with pytest.raises(InvalidInputError, match="backend 'torch' for t5 runs the checkpoint's torch modules.*"
                                                "torch_runners"):
        FluxPipeline.load(fp32_exports["dev"], backend={"t5": "torch"})


def test_defaults_batches_and_seed(fp32_exports):
    pipe = FluxPipeline.load(fp32_exports["schnell"])
    out = pipe(["a", "b"], height=32, width=48, num_images_per_prompt=3, seed=7, output_type="pil")
    assert len(out.images) == 6 and out.images[0].size == (48, 32)
    assert out.settings["num_inference_steps"] == 4 and out.settings["max_sequence_length"] == 256
    again = pipe(["a", "b"], height=32, width=48, num_images_per_prompt=3, seed=7, output_type="np").images
    first = np.asarray(out.images[0])
    np.testing.assert_array_equal(first, (again[0] * 255).round().astype(np.uint8))
    with pytest.warns(GuidanceIgnoredWarning, match="schnell has no guidance input"):
        pipe("a", height=32, width=32, guidance_scale=3.5, num_inference_steps=1)
    dev = FluxPipeline.load(fp32_exports["dev"])
    settings = dev("a", height=32, width=32, num_inference_steps=1, seed=1).settings
    assert settings["guidance_scale"] == 3.5 and settings["max_sequence_length"] == 512


@pytest.mark.parametrize("kwargs,message", [
    (dict(height=30), "height must be a positive multiple of 16 pixels, got 30"),
    (dict(width=0), "width must be a positive multiple of 16 pixels, got 0"),
    (dict(num_inference_steps=0), r"num_inference_steps must be an integer in \[1, 1000\], got 0"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan"),
    (dict(max_sequence_length=513), r"max_sequence_length must be an integer in \[1, 512\], got 513"),
    (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*64 - 1\], got -1"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer, got 0"),
    (dict(latents=np.zeros((1, 3, 64), np.float32)), r"latents have shape \(1, 3, 64\), expected \(1, 4, 64\)"),
    (dict(output_type="latent"), "output_type must be 'pil' or 'np', got 'latent'"),
])
def test_parameter_errors(fp32_exports, kwargs, message):
    pipe = FluxPipeline.load(fp32_exports["dev"])
    args = dict(prompt="a", height=32, width=32, num_inference_steps=1)
    with pytest.raises(InvalidInputError, match=message):
        pipe(**dict(args, **kwargs))


def test_runtime_works_without_torch(fp32_exports, tmp_path):
    code = f"""
import sys
sys.modules['torch'] = None  # any import of torch now fails
from fluxrt.runtime import FluxPipeline
image = FluxPipeline.load({str(fp32_exports['dev'])!r})('a fox', height=32, width=32, num_inference_steps=2,
                                                         seed=0).images[0]
image.save({str(tmp_path / 'x.png')!r})
assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert (tmp_path / "x.png").stat().st_size > 0


def test_cli_generate_writes_png_with_settings(fp32_exports, tmp_path):
    from PIL import Image

    out = tmp_path / "img.png"
    r = subprocess.run([sys.executable, "-m", "fluxrt.cli", "generate", "--onnx", str(fp32_exports["dev"]),
                        "--prompt", "a paper boat", "--out", str(out), "--height", "32", "--width", "48",
                        "--steps", "2", "--seed", "5", "--num-images", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "step 2/2" in r.stderr
    image = Image.open(tmp_path / "img-1.png")
    assert image.size == (48, 32)
    assert image.text["fluxrt:prompt"] == "a paper boat" and image.text["fluxrt:seed"] == "5"
    assert image.text["fluxrt:num_inference_steps"] == "2" and image.text["fluxrt:index"] == "1"
    r = subprocess.run([sys.executable, "-m", "fluxrt.cli", "generate", "--onnx", str(fp32_exports["dev"]),
                        "--prompt", "x", "--out", str(out), "--height", "33"], capture_output=True, text=True)
    assert r.returncode == 2 and "height must be a positive multiple of 16 pixels, got 33" in r.stderr
    assert "Traceback" not in r.stderr


def test_cuda_graph_needs_the_transformer_on_ort_cuda(fp32_exports):
    from fluxrt.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="cuda_graph replays the ort-cuda transformer.*'ort-cpu'"):
        FluxPipeline.load(fp32_exports["dev"], backend="ort-cpu", cuda_graph=True)


def test_torch_backend_refuses_a_changed_checkpoint(tiny_checkpoints, tmp_path):
    """The torch backend reopens the source checkpoint by its path: one edited since the export is refused."""
    import shutil

    from fluxrt.artifacts import ExportFolder
    from fluxrt.errors import CheckpointError
    from fluxrt.export.checkpoint import Checkpoint
    from fluxrt.export.onnx_export import ExportRequest, export_checkpoint
    from fluxrt.export.torch_runner import torch_runners

    ckpt = shutil.copytree(tiny_checkpoints["dev"], tmp_path / "ckpt")
    export_checkpoint(Checkpoint.open(ckpt), tmp_path / "onnx", ExportRequest(("clip",), "fp32"))
    folder = ExportFolder.open(tmp_path / "onnx")
    assert torch_runners(folder, ("clip",))["clip"].backend == "torch"
    config = ckpt / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("3.0", "2.0"))
    with pytest.raises(CheckpointError, match=r"checkpoint .*ckpt changed since .*onnx was exported from it"):
        torch_runners(folder, ("clip",))
