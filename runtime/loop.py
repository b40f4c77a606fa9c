"""The text-to-image loop, and image-to-image's encoding, as free functions over runners, like BFL's
``denoise``: each takes the runners and arrays it needs and returns arrays, so the pipeline, the
benchmarks and FP8 calibration all call the same code.  Host code only (numpy, or cupy when the
runners live on a GPU).
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from fluxrt import dtypes
from fluxrt.dtypes import Array, array_module
from fluxrt.errors import NumericError
from fluxrt.runner import Runner
from fluxrt.runtime import sampling


def to_device(runner: Runner, x: Array) -> Array:
    """``x`` where ``runner`` wants its inputs (host numpy or device cupy)."""
    if runner.device == "cuda":
        return dtypes.to_cupy(x)  # bfloat16 as its bits, from the host or a device bfloat16 array
    if runner.device == "cpu" and array_module(x) is not np:
        return x.get().view(dtypes.numpy_dtype("bfloat16")) if dtypes.is_bf16_bits(x) else x.get()
    return x


def cast_input(runner: Runner, name: str, x: Array) -> Array:
    return dtypes.cast(x, runner.input_dtype(name))


def run_stage(runner: Runner, feed: Mapping[str, Array], check: bool = True) -> dict[str, Array]:
    """``runner.infer`` on ``feed`` (moved to its device); NaN or Inf in an output is a NumericError (``check``
    False: the caller checks)."""
    out = runner.infer({k: to_device(runner, v) for k, v in feed.items()})
    for name, value in out.items() if check else ():
        if str(value.dtype) != "int32" and not bool(array_module(value).isfinite(dtypes.to_float32(value)).all()):
            raise not_finite(runner, name)
    return out


def not_finite(runner: Runner, name: str) -> NumericError:
    hint = {"fp16": "at fp16 this usually means an overflow: try a bf16 or fp32 export",
            "bf16": "try an fp32 export"}.get(runner.precision, "the graph or its inputs are broken "
                                                                 "(the weights, or an extreme input)")
    return NumericError(f"stage {runner.name} ({runner.backend}, {runner.precision}) produced NaN or Inf in "
                        f"{name!r}; {hint}")


# One kernel for the loop's work between two transformer calls on a GPU: the velocity upcast, its finiteness
# check, the Euler step in float32 (multiply, then add, each rounded: what the array operations compute) and the
# next step's input in the transformer's dtype (bfloat16 rounded to nearest even, as dtypes.cast).
UPCAST = {"uint16": "const float v = __uint_as_float(((unsigned int)velocity) << 16);",  # bfloat16 bits
          "float16": "const float v = (float)velocity;", "float32": "const float v = velocity;"}
DOWNCAST = {"uint16": "const unsigned int bits = __float_as_uint(y);\n"
                      "next_input = (unsigned short)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);",
            "float16": "next_input = float16(y);", "float32": "next_input = y;"}
STEP = "if (!isfinite(v)) atomicOr(&flag[0], 1);\nconst float y = __fadd_rn(latents, __fmul_rn(dt, v));\nnew_latents = y;"


def fused_step(velocity, latents, dt, input_dtype: str):
    """``(latents + dt * velocity, that in input_dtype, a flag [1] that is not 0 where velocity is not finite)``
    on cupy arrays in one launch; velocity in bfloat16 bits, float16 or float32 (UPCAST, STEP, DOWNCAST)."""
    import cupy

    in_bf16 = input_dtype == "bfloat16"
    kernel = step_kernel(str(velocity.dtype), "uint16" if in_bf16 else input_dtype)
    flag = cupy.zeros(1, dtype=cupy.int32)
    new_latents = cupy.empty(latents.shape, dtype=cupy.float32)
    next_input = cupy.empty(latents.shape, dtype=cupy.uint16 if in_bf16 else input_dtype)
    kernel(velocity, latents, cupy.float32(dt), new_latents, next_input, flag)
    return new_latents, next_input, flag


_KERNELS: dict = {}


def step_kernel(vel_dtype: str, in_dtype: str):
    import cupy

    key = (vel_dtype, in_dtype)
    if key not in _KERNELS:
        if vel_dtype not in UPCAST or in_dtype not in DOWNCAST:
            raise NumericError(f"the fused Euler step takes velocities and inputs in bfloat16, float16 or float32, "
                               f"got {vel_dtype} and {in_dtype}")
        _KERNELS[key] = cupy.ElementwiseKernel(
            "V velocity, float32 latents, float32 dt", "float32 new_latents, I next_input, raw int32 flag",
            "\n".join((UPCAST[vel_dtype], STEP, DOWNCAST[in_dtype])), f"fluxrt_euler_step_{vel_dtype}_{in_dtype}")
    return _KERNELS[key]


def denoise(transformer: Runner, latents: Array, pooled: Array, text: Array, img_ids: np.ndarray,
            sigmas: np.ndarray, guidance: float | None = None,
            callback: Callable[[int, int], None] | None = None) -> Array:
    """The flow-match Euler loop: packed float32 ``latents`` [B, N, 64] after ``len(sigmas) - 1`` steps.

    ``pooled`` [B, 768] and ``text`` [B, S, 4096] are the prompt embeddings (any float dtype, cast to
    the transformer's), ``img_ids`` [N, 3] the image positions, ``sigmas`` float32 [steps + 1] the
    schedule (:func:`sampling.get_sigmas`), ``guidance`` the scale for a model with a guidance input.
    Latents accumulate in float32; everything constant goes to the device once, before the first step.
    """
    batch, steps = latents.shape[0], len(sigmas) - 1
    feed = {
        "encoder_hidden_states": cast_input(transformer, "encoder_hidden_states", text),
        "pooled_projections": cast_input(transformer, "pooled_projections", pooled),
        "img_ids": img_ids,
        "txt_ids": sampling.text_ids(text.shape[1]),
    }
    if "guidance" in transformer.spec.input_names:
        feed["guidance"] = np.full((batch,), guidance, dtype=np.float32)
    feed = {k: to_device(transformer, v) for k, v in feed.items()}
    timesteps = to_device(transformer, np.repeat(sigmas[:steps, None], batch, axis=1).astype(np.float32))  # [steps, B]
    latents = to_device(transformer, latents)
    fused = array_module(latents) is not np and str(latents.dtype) == "float32"  # cupy: one kernel per step
    next_input = cast_input(transformer, "hidden_states", latents)
    for i in range(steps):
        feed["hidden_states"] = next_input
        feed["timestep"] = timesteps[i]
        if fused:
            velocity = run_stage(transformer, feed, check=False)["latent"]  # [B, N, 64]
            dt = np.float32(sigmas[i + 1]) - np.float32(sigmas[i])
            latents, next_input, flag = fused_step(velocity, latents, dt, transformer.input_dtype("hidden_states"))
            if int(flag.get()[0]):
                raise not_finite(transformer, "latent")
        else:
            velocity = dtypes.to_float32(run_stage(transformer, feed)["latent"])  # [B, N, 64]
            latents = sampling.euler_step(latents, velocity, float(sigmas[i]), float(sigmas[i + 1]))
            next_input = cast_input(transformer, "hidden_states", latents)
        if callback is not None:
            callback(i + 1, steps)
    return latents


def encode(vae_encoder: Runner, pixels: np.ndarray, scaling_factor: float, shift_factor: float) -> Array:
    """Images float32 [K, H, W, 3] in [0, 1] -> their latents [K, 16, h, w] in the transformer's space: the VAE
    encoder's posterior mean of ``2 * pixels - 1``, shifted and scaled (:func:`sampling.encode_latents_scale`)."""
    images = np.ascontiguousarray((np.float32(2) * pixels - np.float32(1)).transpose(0, 3, 1, 2))  # [K, 3, H, W]
    mean = run_stage(vae_encoder, {"images": cast_input(vae_encoder, "images", images)})["latent"]  # [K, 16, h, w]
    return sampling.encode_latents_scale(mean, scaling_factor, shift_factor)


def decode(vae_decoder: Runner, latents: Array, height: int, width: int, vae_scale_factor: int,
           scaling_factor: float, shift_factor: float) -> Array:
    """Packed latents [B, N, 64] -> images [B, 3, H, W] in [-1, 1]."""
    latents = sampling.unpack_latents(latents, height, width, vae_scale_factor)  # [B, 16, h, w]
    latents = sampling.decode_latents_scale(latents, scaling_factor, shift_factor)
    return run_stage(vae_decoder, {"latent": cast_input(vae_decoder, "latent", latents)})["images"]
