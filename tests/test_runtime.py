"""The runtime against diffusers: same schedule, same token ids, same images from the same latents."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from fluxrt.errors import InvalidInputError
from fluxrt.runtime import FluxPipeline, sampling
from fluxrt.runtime.pipeline import GuidanceIgnoredWarning
from fluxrt.runtime.tokenizer import PromptTokenizer, PromptTruncatedWarning

DEV_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                     num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
SCHNELL_SCHEDULER = dict(DEV_SCHEDULER, shift=1.0, use_dynamic_shifting=False)
IMAGE_TOL = 2e-4  # float32 ONNX Runtime vs float32 torch through the whole loop and the VAE, images in [0, 1]


def diffusers_sigmas(config: dict, steps: int, seq_len: int) -> np.ndarray:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(seq_len, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"],
                         config["max_shift"])
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas.numpy(), scheduler.timesteps.numpy()


@pytest.mark.parametrize("config", [DEV_SCHEDULER, SCHNELL_SCHEDULER], ids=["dev", "schnell"])
@pytest.mark.parametrize("side", [(256, 256), (512, 512), (768, 1024), (1024, 1024), (1536, 1536), (2048, 2048)])
def test_schedule_equals_diffusers(config, side):
    seq_len = (side[0] // 16) * (side[1] // 16)
    for steps in range(1, 51):
        want, timesteps = diffusers_sigmas(config, steps, seq_len)
        got = sampling.get_sigmas(steps, seq_len, config)
        assert got.dtype == np.float32 and got.shape == (steps + 1,)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7, err_msg=f"{steps} steps at {side}")
        np.testing.assert_allclose(got[:-1] * 1000, timesteps, rtol=1e-6)


def test_euler_loop_equals_scheduler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
    sigmas = sampling.get_sigmas(7, 1024, DEV_SCHEDULER)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 7, 7), mu=sampling.calculate_shift(1024))
    rng = np.random.default_rng(0)
    ours = theirs = rng.standard_normal((2, 16, 64)).astype(np.float32)
    theirs = torch.from_numpy(theirs)
    for i, t in enumerate(scheduler.timesteps):
        v = rng.standard_normal((2, 16, 64)).astype(np.float32)
        theirs = scheduler.step(torch.from_numpy(v), t, theirs).prev_sample
        ours = sampling.euler_step(ours, v, sigmas[i], sigmas[i + 1])
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=1e-6)


def test_packing_and_ids_equal_diffusers():
    from diffusers import FluxPipeline as DiffusersFlux

    x = np.random.default_rng(0).standard_normal((2, 16, 6, 10)).astype(np.float32)
    packed = DiffusersFlux._pack_latents(torch.from_numpy(x), 2, 16, 6, 10).numpy()
    np.testing.assert_array_equal(sampling.pack_latents(x), packed)
    unpacked = DiffusersFlux._unpack_latents(torch.from_numpy(packed), 48, 80, 8).numpy()
    np.testing.assert_array_equal(sampling.unpack_latents(packed, 48, 80, 8), unpacked)
    ids = DiffusersFlux._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(sampling.image_ids(48, 80, 8), ids)


def test_sampler_errors():
    with pytest.raises(InvalidInputError, match="num_inference_steps must be a positive integer, got 0"):
        sampling.get_sigmas(0, 256, DEV_SCHEDULER)
    with pytest.raises(InvalidInputError, match=r"sets \['use_karras_sigmas'\]"):
        sampling.get_sigmas(4, 256, dict(DEV_SCHEDULER, use_karras_sigmas=True))
    with pytest.raises(InvalidInputError, match="packed latents have 10 tokens, a 64x64 image needs 16"):
        sampling.unpack_latents(np.zeros((1, 10, 64), np.float32), 64, 64, 8)


PROMPTS = [
    "", "cat", "A photo of a CAT!! 123", "an astronaut riding a horse on the moon, digital art",
    "Ünïcödé façade — 東京タワー 🙂🚀 naïve café", "  tabs\tand\n\nnewlines   and    spaces  ",
    "don't stop; it's 3.14159 o'clock & 50% off!!!", "UPPER lower MiXeD 42 4 2",
    " ".join(["a lighthouse on a cliff at dawn, oil painting"] * 30),  # > 77 and > 256 tokens
    " ".join(["portrait of an old fisherman, 35mm film photo"] * 60),  # > 512 tokens
]


@pytest.fixture(scope="module")
def tokenizers(fp32_exports, tiny_checkpoints):
    from transformers import CLIPTokenizer, T5TokenizerFast

    root, folder = tiny_checkpoints["dev"], fp32_exports["dev"]
    return {
        "clip": (PromptTokenizer.from_file(folder / "tokenizer" / "tokenizer.json", "clip"),
                 CLIPTokenizer.from_pretrained(root / "tokenizer")),
        "t5": (PromptTokenizer.from_file(folder / "tokenizer_2" / "tokenizer.json", "t5"),
               T5TokenizerFast.from_pretrained(root / "tokenizer_2")),
    }


@pytest.mark.parametrize("kind,max_length", [("clip", 77), ("t5", 16), ("t5", 256), ("t5", 512), ("clip", 16)])
def test_token_ids_equal_transformers(tokenizers, kind, max_length):
    ours, theirs = tokenizers[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        got = ours.encode(PROMPTS, max_length)
    want = theirs(PROMPTS, padding="max_length", max_length=max_length, truncation=True).input_ids
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.array(want))


def test_truncation_warns_with_count(tokenizers):
    ours, theirs = tokenizers["clip"]
    full = len(theirs(PROMPTS[8]).input_ids)
    with pytest.warns(PromptTruncatedWarning, match=f"clip prompt 0 has {full} tokens; the limit is 77, so the "
                                                    f"last {full - 77} were dropped"):
        ours.encode([PROMPTS[8]], 77)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.encode(["short prompt"], 77)  # no warning when nothing is dropped


def test_tokenizer_file_errors(tmp_path):
    from fluxrt.errors import ExportError

    with pytest.raises(ExportError, match="t5 tokenizer file .*absent.json is missing"):
        PromptTokenizer.from_file(tmp_path / "absent.json", "t5")
    bad = tmp_path / "bad.json"
    bad.write_text("{ this is not")
    with pytest.raises(ExportError, match="clip tokenizer file .*bad.json is not a readable tokenizers JSON"):
        PromptTokenizer.from_file(bad, "clip")


def packed_noise(batch: int, height: int, width: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, (height // 16) * (width // 16), 64, generator=g).numpy()


# (prompts, images per prompt, height, width, steps, max_sequence_length)
CASES = [
    (["a red fox in the snow"], 1, 64, 64, 1, 16),
    (["a lighthouse on a cliff", "two cats under neon lights"], 2, 48, 80, 4, 33),  # non-square, batch 4
    (["an astronaut riding a horse on the moon, digital art"], 1, 96, 64, 7, 128),
]


@pytest.mark.parametrize("variant", ["dev", "schnell"])
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
    assert np.abs(got - want).max() < IMAGE_TOL
    assert want.std() > 1e-3  # the comparison is not between two blank images


def test_torch_backend_and_mixed_setup(fp32_exports):
    """The torch reference backend, and T5 on torch with the rest on ONNX Runtime, give the ORT images."""
    latents = packed_noise(1, 64, 48, 0)
    args = dict(prompt="a koi pond", height=64, width=48, num_inference_steps=2, max_sequence_length=24,
                latents=latents, output_type="np")
    ort_images = FluxPipeline.load(fp32_exports["dev"], backend="ort-cpu")(**args).images
    torch_images = FluxPipeline.load(fp32_exports["dev"], backend="torch")(**args).images
    mixed = FluxPipeline.load(fp32_exports["dev"], backend={"t5": "torch", "clip": "ort-cpu",
                                                             "transformer": "ort-cpu", "vae_decoder": "torch"})
    assert np.abs(torch_images - ort_images).max() < IMAGE_TOL
    assert np.abs(mixed(**args).images - ort_images).max() < IMAGE_TOL


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
