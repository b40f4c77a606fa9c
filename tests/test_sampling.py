"""The sampler's pure functions against diffusers' FluxPipeline and FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers import FluxPipeline as DiffusersFlux
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from fluxrt.errors import InvalidInputError
from fluxrt.runtime import sampling

# the scheduler_config.json files of black-forest-labs/FLUX.1-dev and FLUX.1-schnell
DEV = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
       "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
SCHNELL = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
           "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
SIDES = [(256, 256), (512, 512), (768, 1024), (1024, 1024), (1536, 1536), (2048, 2048)]


def diffusers_schedule(config: dict, steps: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """sigmas and timesteps as FluxPipeline.__call__ sets them on the scheduler."""
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(seq_len, scheduler.config.get("base_image_seq_len", 256),
                         scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                         scheduler.config.get("max_shift", 1.15))
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
    return scheduler.sigmas.numpy(), scheduler.timesteps.numpy()


@pytest.mark.parametrize("config", [DEV, SCHNELL], ids=["dev", "schnell"])
@pytest.mark.parametrize("side", SIDES, ids=[f"{h}x{w}" for h, w in SIDES])
def test_sigmas_and_timesteps_equal_diffusers(config, side):
    seq_len = (side[0] // 16) * (side[1] // 16)
    for steps in range(1, 51):
        want_sigmas, want_timesteps = diffusers_schedule(config, steps, seq_len)
        got = sampling.get_sigmas(steps, seq_len, config)
        assert got.dtype == np.float32 and got.shape == (steps + 1,) and got[-1] == 0
        # tolerance 0: the same float32 operations in the same order; 1 ulp off would mean a different formula
        np.testing.assert_array_equal(got, want_sigmas, err_msg=f"{steps} steps at {side}")
        np.testing.assert_array_equal(got[:-1] * np.float32(1000), want_timesteps, err_msg=f"{steps} steps at {side}")


@pytest.mark.parametrize("extra", [{"time_shift_type": "linear"}, {"shift_terminal": 0.1},
                                   {"shift_terminal": 0.02, "time_shift_type": "linear"}], ids=str)
def test_other_supported_options_equal_diffusers(extra):
    for config in (dict(DEV, **extra), dict(SCHNELL, shift=3.0, **extra)):
        for steps in (2, 4, 28, 50):
            want, _ = diffusers_schedule(config, steps, 4096)
            np.testing.assert_array_equal(sampling.get_sigmas(steps, 4096, config), want)


def test_saved_scheduler_config_is_accepted():
    """What save_pretrained writes: every option at its default, plus _class_name and _diffusers_version."""
    config = dict(FlowMatchEulerDiscreteScheduler(**DEV).config, _class_name="FlowMatchEulerDiscreteScheduler")
    np.testing.assert_array_equal(sampling.get_sigmas(28, 4096, config), sampling.get_sigmas(28, 4096, DEV))


def test_calculate_shift_equals_diffusers():
    for seq_len in (16, 256, 1024, 3072, 4096, 16384):
        assert sampling.calculate_shift(seq_len) == calculate_shift(seq_len)
        assert sampling.calculate_shift(seq_len, 128, 2048, 0.3, 1.5) == calculate_shift(seq_len, 128, 2048, 0.3, 1.5)


def test_euler_loop_equals_scheduler_step():
    """Float32 model output: our float32 loop and diffusers' steps agree bit for bit."""
    steps, seq_len = 9, 1024
    scheduler = FlowMatchEulerDiscreteScheduler(**DEV)
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps),
                       mu=calculate_shift(seq_len))
    sigmas = sampling.get_sigmas(steps, seq_len, DEV)
    rng = np.random.default_rng(0)
    ours = rng.standard_normal((2, seq_len, 64), dtype=np.float32)
    theirs = torch.from_numpy(ours.copy())
    scheduler.set_begin_index(0)
    for i, t in enumerate(scheduler.timesteps):
        v = rng.standard_normal((2, seq_len, 64), dtype=np.float32)
        theirs = scheduler.step(torch.from_numpy(v), t, theirs, return_dict=False)[0]
        ours = sampling.euler_step(ours, v, float(sigmas[i]), float(sigmas[i + 1]))
        assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs.numpy())


def test_euler_step_upcasts_half_velocity():
    """A float16 velocity is upcast before the update, and the latents stay float32."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 16, 64), dtype=np.float32)
    v = rng.standard_normal((1, 16, 64)).astype(np.float16)
    got = sampling.euler_step(x, v, 0.8, 0.6)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x + (np.float32(0.6) - np.float32(0.8)) * v.astype(np.float32))


@pytest.mark.parametrize("batch,channels,height,width", [(1, 16, 256, 256), (2, 16, 768, 1024), (3, 4, 48, 80)])
def test_packing_and_ids_equal_diffusers(batch, channels, height, width):
    h, w = sampling.latent_size(height, width, 8)
    assert (h, w) == (2 * (height // 16), 2 * (width // 16))
    x = np.random.default_rng(0).standard_normal((batch, channels, h, w), dtype=np.float32)
    want_packed = DiffusersFlux._pack_latents(torch.from_numpy(x), batch, channels, h, w).numpy()
    packed = sampling.pack_latents(x)
    np.testing.assert_array_equal(packed, want_packed)
    want = DiffusersFlux._unpack_latents(torch.from_numpy(want_packed), height, width, 8).numpy()
    np.testing.assert_array_equal(sampling.unpack_latents(packed, height, width, 8), want)
    np.testing.assert_array_equal(want, x)
    ids = DiffusersFlux._prepare_latent_image_ids(batch, h // 2, w // 2, "cpu", torch.float32).numpy()
    got_ids = sampling.image_ids(height, width, 8)
    assert got_ids.dtype == np.float32
    np.testing.assert_array_equal(got_ids, ids)
    text = sampling.text_ids(77)
    assert text.dtype == np.float32 and text.shape == (77, 3) and not text.any()


def test_initial_noise_is_seeded_pcg64():
    noise = sampling.initial_noise(7, 2, 128, 64, 16, 8)
    assert noise.dtype == np.float32 and noise.shape == (2, 16, 16, 8)
    want = np.random.Generator(np.random.PCG64(7)).standard_normal((2, 16, 16, 8), dtype=np.float32)
    np.testing.assert_array_equal(noise, want)
    assert not np.array_equal(noise, sampling.initial_noise(8, 2, 128, 64, 16, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_uint8_images_equal_vae_image_processor(dtype):
    rng = np.random.default_rng(3)
    x = rng.uniform(-1.2, 1.2, (2, 3, 16, 24)).astype(np.float32)
    x[0, 0, 0, :8] = (np.arange(8) + 0.5) / 255 * 2 - 1  # exactly on rounding boundaries
    x = torch.from_numpy(x).to(dtype)
    pil = VaeImageProcessor(vae_scale_factor=16).postprocess(x, output_type="pil")
    want = np.stack([np.asarray(im) for im in pil])
    got = sampling.to_uint8_images(x.numpy())
    assert got.dtype == np.uint8 and got.shape == (2, 16, 24, 3)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "4"])
def test_bad_step_count(steps):
    with pytest.raises(InvalidInputError, match=f"num_inference_steps must be a positive integer, got {steps!r}"):
        sampling.get_sigmas(steps, 256, DEV)


@pytest.mark.parametrize("option", sampling.UNSUPPORTED_OPTIONS)
def test_unsupported_scheduler_options_are_refused(option):
    with pytest.raises(InvalidInputError, match=rf"scheduler config sets \['{option}'\]; fluxrt supports"):
        sampling.get_sigmas(4, 256, dict(DEV, **{option: True}))
    sampling.get_sigmas(4, 256, dict(DEV, **{option: False}))  # present but off is fine


@pytest.mark.parametrize("change,message", [
    ({"time_shift_type": "cosine"}, "scheduler time_shift_type 'cosine' is not one of"),
    ({"num_train_timesteps": 500}, "scheduler num_train_timesteps is 500; FLUX's pipeline divides"),
    ({"sigma_schedule": "x"}, r"scheduler config has unknown options \['sigma_schedule'\]"),
    ({"_class_name": "EulerDiscreteScheduler"}, "scheduler class 'EulerDiscreteScheduler' is not supported"),
    ({"base_shift": None}, "scheduler base_shift must be a number, got None"),
    ({"shift_terminal": 1.5}, r"scheduler shift_terminal must be a number in \[0, 1\) or null, got 1.5"),
    ({"shift_terminal": 0.1, "steps": 1}, "scheduler shift_terminal 0.1 needs at least 2 steps"),
], ids=lambda v: str(v)[:30])
def test_bad_scheduler_configs(change, message):
    config = dict(DEV, **change)
    steps = config.pop("steps", 4)
    with pytest.raises(InvalidInputError, match=message):
        sampling.get_sigmas(steps, 256, config)


def test_size_errors():
    with pytest.raises(InvalidInputError, match="height must be a positive multiple of 16 pixels, got 1000"):
        sampling.latent_size(1000, 1024, 8)
    with pytest.raises(InvalidInputError, match="width must be a positive multiple of 16 pixels, got 0"):
        sampling.image_ids(1024, 0, 8)
    with pytest.raises(InvalidInputError, match="height must be a positive multiple of 16 pixels, got 520"):
        sampling.initial_noise(0, 1, 520, 512, 16, 8)
    with pytest.raises(InvalidInputError, match="packed latents have 10 tokens, a 64x64 image needs 16"):
        sampling.unpack_latents(np.zeros((1, 10, 64), np.float32), 64, 64, 8)
    with pytest.raises(InvalidInputError, match=r"packed latents have shape \(16, 64\), expected \[B, N, 4\*C\]"):
        sampling.unpack_latents(np.zeros((16, 64), np.float32), 64, 64, 8)
    with pytest.raises(InvalidInputError, match=r"latents to pack have shape \(1, 16, 5, 4\), expected"):
        sampling.pack_latents(np.zeros((1, 16, 5, 4), np.float32))
    with pytest.raises(InvalidInputError, match="seed must be a non-negative integer, got -1"):
        sampling.initial_noise(-1, 1, 64, 64, 16, 8)
    with pytest.raises(InvalidInputError, match=r"images have shape \(1, 4, 8, 8\), expected \[B, 3, H, W\]"):
        sampling.to_uint8_images(np.zeros((1, 4, 8, 8), np.float32))
