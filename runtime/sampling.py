"""The flow-matching Euler sampler of FLUX.1 as pure functions on numpy (or cupy) arrays.

Schedules reproduce diffusers' FluxPipeline + FlowMatchEulerDiscreteScheduler in float32;
sigmas are the units everywhere (the transformer's ``timestep`` input is the sigma itself).
"""

from __future__ import annotations

import math

import numpy as np

from fluxrt.errors import InvalidInputError

# scheduler options FLUX's published configs use; anything else changes the schedule and is refused
SUPPORTED_FALSE_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                           "stochastic_sampling", "shift_terminal", "use_flow_sigmas")


def xp_of(x):
    """numpy or cupy, whichever owns ``x``."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu of the resolution-dependent shift: linear in the number of image tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def check_scheduler_config(config: dict) -> None:
    used = [k for k in SUPPORTED_FALSE_OPTIONS if config.get(k)]
    if used:
        raise InvalidInputError(f"scheduler config sets {used}; fluxrt supports FLUX's flow-match Euler schedule "
                                f"only (these options must be unset or false)")
    if config.get("time_shift_type", "exponential") not in ("exponential", "linear"):
        raise InvalidInputError(f"scheduler time_shift_type {config['time_shift_type']!r} is not 'exponential' "
                                f"or 'linear'")


def get_sigmas(num_steps: int, image_seq_len: int, config: dict) -> np.ndarray:
    """float32 [num_steps + 1]: the sigmas of each step, then 0."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise InvalidInputError(f"num_inference_steps must be a positive integer, got {num_steps!r}")
    check_scheduler_config(config)
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if config.get("use_dynamic_shifting", False):
        mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        if config.get("time_shift_type", "exponential") == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
    else:
        shift = config.get("shift", 1.0)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return np.append(sigmas.astype(np.float32), np.float32(0.0))


def euler_step(latents, velocity, sigma: float, sigma_next: float):
    """One flow-matching Euler step, in float32 whatever the model's dtype (diffusers also upcasts,
    but then rounds back to the model dtype every step; we keep float32 across the loop)."""
    dt = np.float32(sigma_next) - np.float32(sigma)
    return latents.astype(np.float32, copy=False) + dt * velocity.astype(np.float32)


def latent_size(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """Latent (h, w) for an image, as diffusers rounds: a multiple of 2 for the 2x2 packing."""
    return 2 * (int(height) // (vae_scale_factor * 2)), 2 * (int(width) // (vae_scale_factor * 2))


def pack_latents(latents):
    """[B, C, h, w] -> [B, (h/2)*(w/2), C*4]: 2x2 patches, channel-major inside a patch."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed, height: int, width: int, vae_scale_factor: int):
    """[B, N, C*4] -> [B, C, h, w] for an image of ``height`` x ``width`` pixels."""
    b, n, c4 = packed.shape
    h, w = latent_size(height, width, vae_scale_factor)
    if n != (h // 2) * (w // 2):
        raise InvalidInputError(f"packed latents have {n} tokens, a {height}x{width} image needs {(h // 2) * (w // 2)}")
    x = packed.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(height: int, width: int, vae_scale_factor: int) -> np.ndarray:
    """float32 [N, 3]: (0, row, column) of each 2x2 patch."""
    h, w = latent_size(height, width, vae_scale_factor)
    ids = np.zeros((h // 2, w // 2, 3), dtype=np.float32)
    ids[..., 1] = np.arange(h // 2, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(w // 2, dtype=np.float32)[None, :]
    return ids.reshape(-1, 3)


def text_ids(seq_len: int) -> np.ndarray:
    return np.zeros((seq_len, 3), dtype=np.float32)  # [S, 3]


def initial_noise(seed: int, batch: int, height: int, width: int, channels: int, vae_scale_factor: int) -> np.ndarray:
    """float32 [B, C, h, w] standard normal from numpy's PCG64 (not torch's generator: pass
    ``latents`` to reproduce a diffusers image bit for bit)."""
    h, w = latent_size(height, width, vae_scale_factor)
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.standard_normal((batch, channels, h, w), dtype=np.float32)


def decode_latents_scale(latents, scaling_factor: float, shift_factor: float):
    """What the VAE decoder's ``latent`` input expects."""
    return latents / np.float32(scaling_factor) + np.float32(shift_factor)


def to_uint8_images(images) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], rounding as diffusers' image processor does."""
    x = np.clip(np.asarray(images, dtype=np.float32) / 2 + 0.5, 0, 1)
    return (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
