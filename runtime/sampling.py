"""The flow-matching Euler sampler of FLUX.1 as pure functions on numpy (or cupy) arrays.

Schedules reproduce diffusers' ``FluxPipeline`` + ``FlowMatchEulerDiscreteScheduler`` in float32.
Sigmas are the unit everywhere: the transformer's ``timestep`` input is the sigma itself, in [0, 1]
(diffusers' ``scheduler.timesteps`` are ``sigmas * 1000``; the pipeline divides them back).

The array functions use only array methods or the array's own namespace, so they run unchanged
on cupy arrays; the functions that create arrays (ids, noise) return host numpy arrays.
"""

from __future__ import annotations

import math

import numpy as np

from fluxrt.dtypes import Array, array_module
from fluxrt.errors import InvalidInputError

SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
# options of diffusers' scheduler that FLUX's configs leave unset or false; each changes the schedule
# or the step (karras/exponential/beta spacing, Mochi's inversion, SDE sampling, the pipeline's
# use_flow_sigmas) and is refused rather than ignored
UNSUPPORTED_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                       "stochastic_sampling", "use_flow_sigmas")
SUPPORTED_OPTIONS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                     "base_image_seq_len", "max_image_seq_len", "shift_terminal", "time_shift_type")
TIME_SHIFT_TYPES = ("exponential", "linear")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu of the resolution-dependent shift: linear in the number of image tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def check_scheduler_config(config: dict) -> None:
    """Raise unless ``config`` describes a schedule :func:`get_sigmas` reproduces exactly."""
    cls = config.get("_class_name", SCHEDULER_CLASS)
    if cls != SCHEDULER_CLASS:
        raise InvalidInputError(f"scheduler class {cls!r} is not supported; expected {SCHEDULER_CLASS!r}")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in SUPPORTED_OPTIONS + UNSUPPORTED_OPTIONS)
    if unknown:
        raise InvalidInputError(f"scheduler config has unknown options {unknown}; known options are "
                                f"{list(SUPPORTED_OPTIONS + UNSUPPORTED_OPTIONS)}")
    used = [k for k in UNSUPPORTED_OPTIONS if config.get(k)]
    if used:
        raise InvalidInputError(f"scheduler config sets {used}; fluxrt supports FLUX's flow-match Euler schedule "
                                f"only (these options must be unset or false)")
    kind = config.get("time_shift_type", "exponential")
    if kind not in TIME_SHIFT_TYPES:
        raise InvalidInputError(f"scheduler time_shift_type {kind!r} is not one of {list(TIME_SHIFT_TYPES)}")
    if config.get("num_train_timesteps", 1000) != 1000:
        raise InvalidInputError(f"scheduler num_train_timesteps is {config['num_train_timesteps']!r}; FLUX's "
                                f"pipeline divides timesteps by 1000, so only 1000 is supported")
    numbers = ["shift"] + (["base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len"]
                           if config.get("use_dynamic_shifting") else [])
    for key in numbers:
        value = config.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInputError(f"scheduler {key} must be a number, got {value!r}")
    terminal = config.get("shift_terminal")
    if terminal is not None and not (isinstance(terminal, (int, float)) and 0 <= terminal < 1):
        raise InvalidInputError(f"scheduler shift_terminal must be a number in [0, 1) or null, got {terminal!r}")


def shifted(sigmas: np.ndarray, image_seq_len: int, config: dict) -> np.ndarray:
    """The scheduler's shift of float32 ``sigmas``, with diffusers' operation order."""
    if not config.get("use_dynamic_shifting", False):
        shift = config.get("shift", 1.0)
        return shift * sigmas / (1 + (shift - 1) * sigmas)
    mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    if config.get("time_shift_type", "exponential") == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    return mu / (mu + (1 / sigmas - 1) ** 1.0)


def stretch_to_terminal(sigmas: np.ndarray, terminal: float) -> np.ndarray:
    """Rescale ``1 - sigmas`` so that the last sigma equals ``terminal``."""
    one_minus = 1 - sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


def get_sigmas(num_steps: int, image_seq_len: int, scheduler_config: dict) -> np.ndarray:
    """float32 [num_steps + 1]: the sigma of each step, then 0 (diffusers' ``scheduler.sigmas``).

    ``image_seq_len`` is the number of packed image tokens, ``(H / 16) * (W / 16)``.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise InvalidInputError(f"num_inference_steps must be a positive integer, got {num_steps!r}")
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, (int, np.integer)) or image_seq_len < 1:
        raise InvalidInputError(f"image_seq_len must be a positive integer, got {image_seq_len!r}")
    check_scheduler_config(scheduler_config)
    # FluxPipeline's spacing in float64, which the scheduler rounds to float32 before shifting
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            sigmas = shifted(sigmas, int(image_seq_len), scheduler_config)
    except OverflowError:
        sigmas = np.full(num_steps, np.nan, np.float32)
    if not np.isfinite(sigmas).all():
        raise InvalidInputError(
            f"the scheduler's shift at {image_seq_len} image tokens (base_shift {scheduler_config.get('base_shift')}, "
            f"max_shift {scheduler_config.get('max_shift')}, shift {scheduler_config.get('shift')}) gives a schedule "
            f"that is not finite in float32: use a smaller image or a scheduler config with a smaller shift")
    if scheduler_config.get("shift_terminal"):
        if num_steps < 2:
            raise InvalidInputError(f"scheduler shift_terminal {scheduler_config['shift_terminal']!r} needs at least "
                                    f"2 steps (diffusers' schedule is NaN for 1), got num_inference_steps=1")
        sigmas = stretch_to_terminal(sigmas, scheduler_config["shift_terminal"])
    return np.append(sigmas.astype(np.float32), np.float32(0.0))


def euler_step(latents: Array, velocity: Array, sigma: float, sigma_next: float) -> Array:
    """One flow-matching Euler step: float32 ``latents + (sigma_next - sigma) * velocity``.

    ``velocity`` (the transformer's output, any float dtype) is upcast to float32 first, and the
    result stays float32: the caller keeps latents in float32 across the loop and casts them to
    the model's dtype only for the transformer's feed.  diffusers' ``scheduler.step`` instead
    computes ``dt * velocity`` in the velocity's dtype, adds it to the float32-upcast sample and
    rounds the sum back to the model's dtype every step; for a float32 model the two agree bit
    for bit, for fp16/bf16 ours rounds less.
    """
    dt = np.float32(sigma_next) - np.float32(sigma)
    return latents.astype(np.float32, copy=False) + dt * velocity.astype(np.float32, copy=False)


def latent_size(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """Latent (h, w) of a ``height`` x ``width`` pixel image: ``2 * (size // (2 * vae_scale_factor))``.

    diffusers warns and rounds a size that is not a multiple of ``2 * vae_scale_factor`` down;
    that would silently change the image size, so it is an error here.
    """
    multiple = 2 * vae_scale_factor
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0 or size % multiple:
            raise InvalidInputError(f"{name} must be a positive multiple of {multiple} pixels, got {size!r}")
    return 2 * (int(height) // multiple), 2 * (int(width) // multiple)


def pack_latents(latents: Array) -> Array:
    """[B, C, h, w] -> [B, (h/2)*(w/2), C*4]: 2x2 patches, channel-major inside a patch."""
    if latents.ndim != 4 or latents.shape[2] % 2 or latents.shape[3] % 2:
        raise InvalidInputError(f"latents to pack have shape {tuple(latents.shape)}, expected [B, C, h, w] "
                                f"with even h and w")
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)  # [B, h/2, w/2, C, 2, 2]
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Array, height: int, width: int, vae_scale_factor: int) -> Array:
    """[B, N, C*4] -> [B, C, h, w] for an image of ``height`` x ``width`` pixels."""
    h, w = latent_size(height, width, vae_scale_factor)
    n = (h // 2) * (w // 2)
    if packed.ndim != 3 or packed.shape[2] % 4:
        raise InvalidInputError(f"packed latents have shape {tuple(packed.shape)}, expected [B, N, 4*C]")
    if packed.shape[1] != n:
        raise InvalidInputError(f"packed latents have {packed.shape[1]} tokens, a {height}x{width} image needs {n}")
    b, _, c4 = packed.shape
    x = packed.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)  # [B, C, h/2, 2, w/2, 2]
    return x.reshape(b, c4 // 4, h, w)


def image_ids(height: int, width: int, vae_scale_factor: int) -> np.ndarray:
    """float32 [N, 3]: (0, row, column) of each 2x2 patch, row-major."""
    h, w = latent_size(height, width, vae_scale_factor)
    ids = np.zeros((h // 2, w // 2, 3), dtype=np.float32)
    ids[..., 1] = np.arange(h // 2, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(w // 2, dtype=np.float32)[None, :]
    return ids.reshape(-1, 3)


def text_ids(seq_len: int) -> np.ndarray:
    """float32 zeros [S, 3]: FLUX gives every text token position (0, 0, 0)."""
    return np.zeros((seq_len, 3), dtype=np.float32)


def initial_noise(seed: int, batch: int, height: int, width: int, latent_channels: int,
                  vae_scale_factor: int) -> np.ndarray:
    """float32 [B, C, h, w] standard normal from numpy's PCG64 seeded with ``seed``.

    Not torch's generator, so not diffusers' noise for the same seed: to reproduce a diffusers
    image bit for bit, pass its (packed) ``latents`` to the pipeline instead of a seed.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidInputError(f"seed must be a non-negative integer, got {seed!r}")
    h, w = latent_size(height, width, vae_scale_factor)
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    return rng.standard_normal((batch, latent_channels, h, w), dtype=np.float32)


def decode_latents_scale(latents: Array, scaling_factor: float, shift_factor: float) -> Array:
    """The VAE decoder's ``latent`` input: ``latents / scaling_factor + shift_factor``, in float32.

    diffusers does this in the transformer's dtype; we do it in float32 and cast for the decoder.
    """
    return latents.astype(np.float32, copy=False) / np.float32(scaling_factor) + np.float32(shift_factor)


def encode_latents_scale(latents: Array, scaling_factor: float, shift_factor: float) -> Array:
    """The VAE encoder's posterior mean in the transformer's latent space: ``(latents - shift_factor) *
    scaling_factor``, in float32 (diffusers' ``_encode_vae_image``); the inverse of :func:`decode_latents_scale`."""
    return (latents.astype(np.float32, copy=False) - np.float32(shift_factor)) * np.float32(scaling_factor)


def start_step(num_steps: int, strength: float) -> int:
    """The first of ``num_steps`` steps an image-to-image call runs: ``int(max(N - min(N * strength, N), 0))``
    in Python floats, diffusers' ``get_timesteps``.  The call runs steps ``start .. N - 1`` of the N-step
    schedule, from ``sigmas[start]`` (none when ``start == N``: strength 0)."""
    return int(max(num_steps - min(num_steps * strength, num_steps), 0))


def noised_latents(image_latents: Array, noise: Array, sigma: float) -> Array:
    """Image-to-image's start: float32 ``sigma * noise + (1 - sigma) * image_latents`` (diffusers'
    ``scheduler.scale_noise``, in the same float32 operations); both packed [B, N, 64] (or both unpacked:
    it is element-wise, so packing before or after gives the same numbers)."""
    s = np.float32(sigma)
    return s * noise.astype(np.float32, copy=False) + (np.float32(1) - s) * image_latents.astype(np.float32, copy=False)


def to_uint8_images(images: Array) -> Array:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], as diffusers' ``VaeImageProcessor.postprocess``.

    Denormalizes in the decoder's own dtype (``(x * 0.5 + 0.5).clamp(0, 1)``), then upcasts to
    float32 and rounds ``x * 255`` half to even, like its ``pt_to_numpy`` + ``numpy_to_pil``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise InvalidInputError(f"images have shape {tuple(images.shape)}, expected [B, 3, H, W]")
    xp = array_module(images)
    x = xp.clip(images * 0.5 + 0.5, 0, 1).transpose(0, 2, 3, 1).astype(np.float32)  # [B, H, W, 3]
    return (x * 255).round().astype(np.uint8)
