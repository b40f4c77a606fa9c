"""The FLUX.1 text-to-image pipeline over any runners: tokenize, encode, Euler loop, decode.

Host code only (numpy, or cupy when the runners live on a GPU); no torch.  The call takes the
keyword names diffusers' ``FluxPipeline`` uses for the same things.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fluxrt.errors import ExportError, InvalidInputError, NumericError
from fluxrt.files import sha256_file
from fluxrt.runtime import dtypes, sampling
from fluxrt.runtime.artifacts import ExportFolder
from fluxrt.runtime.runners import Array, OrtRunner, Runner, array_module
from fluxrt.runtime.tokenizer import PromptTokenizer

STAGES = ("clip", "t5", "transformer", "vae_decoder")
BACKENDS = ("ort-cpu", "ort-cuda", "torch", "trt")
DEFAULTS = {  # the variant's published settings
    "dev": dict(num_inference_steps=28, guidance_scale=3.5, max_sequence_length=512),
    "schnell": dict(num_inference_steps=4, guidance_scale=None, max_sequence_length=256),
}
MAX_STEPS = 1000
MAX_SEED = 2**64 - 1


class GuidanceIgnoredWarning(UserWarning):
    """A guidance scale was given for FLUX.1-schnell, which has no guidance input."""


@dataclass
class FluxPipelineOutput:
    images: Any  # list of PIL images, or float32 [B, H, W, 3] in [0, 1] for output_type="np"
    settings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def make_runner(folder, name: str, backend: str, cuda_graph: bool = False) -> Runner:
    if backend == "trt":
        if not hasattr(folder, "verify_plan"):
            raise InvalidInputError(f"backend 'trt' for {name} needs an engine folder (fluxrt build), "
                                    f"{folder.root} is an export folder")
        from fluxrt.engines.runner import TrtRunner

        return TrtRunner.from_engine_folder(folder, name)
    if hasattr(folder, "verify_plan"):
        raise InvalidInputError(f"engine folder {folder.root} holds TensorRT plans: backend for {name} must be "
                                f"'trt', got {backend!r}")
    spec, precision = folder.spec(name), folder.graph_precision(name)
    if backend in ("ort-cpu", "ort-cuda"):
        custom_ops = None
        if folder.record(name).get("attention") == "ort-kernels":
            from fluxrt.runtime.ort_ops import library_path

            custom_ops = library_path()
        return OrtRunner(spec, precision, verified_graph(folder, name), backend=backend, cuda_graph=cuda_graph,
                         custom_ops=custom_ops)
    if backend == "torch":
        from fluxrt.export.torch_runner import TorchRunner  # export extra: the reference backend

        return TorchRunner.from_export_folder(folder, name)
    raise InvalidInputError(f"backend {backend!r} for {name} is not one of {list(BACKENDS)}")


def verified_graph(folder: ExportFolder, name: str) -> Path:
    """The graph's path, if its bytes are the ones the export manifest recorded: a graph swapped
    with another component's (CLIP and T5 share their input names), replaced or truncated is refused."""
    path = folder.graph_path(name)
    want = folder.record(name).get("sha256")
    got = sha256_file(path) if want else None
    if want and got != want:
        raise ExportError(f"{name} graph {path} is not the file the export manifest recorded (sha256 "
                          f"{got[:12]}..., expected {want[:12]}...): swapped, replaced or corrupted; "
                          f"export again")
    return path


def open_folder(path: str | Path):
    """An export folder, or an engine folder (which has engines.json)."""
    if (Path(path) / "engines.json").is_file():
        from fluxrt.engines.folder import EngineFolder

        return EngineFolder.open(path)
    if Path(path).is_dir() and not (Path(path) / "manifest.json").is_file():
        raise ExportError(f"{path} is neither an export folder (no manifest.json, see fluxrt export) nor an engine "
                          f"folder (no engines.json, see fluxrt build)")
    return ExportFolder.open(path)


def check_envelope(envelope, batch: int, height: int, width: int, text_length: int) -> None:
    """Raise unless a call fits the shape envelope an engine folder was built for (before any stage runs)."""
    for name, value, (lo, _, hi), unit in (
            ("height", height, envelope.image_side, " pixels"), ("width", width, envelope.image_side, " pixels"),
            ("batch (prompts x num_images_per_prompt)", batch, envelope.batch, ""),
            ("max_sequence_length", text_length, envelope.text_length, " tokens")):
        if not lo <= value <= hi:
            raise InvalidInputError(f"{name} {value} is outside the engines' range {lo}..{hi}{unit} (the envelope "
                                    f"they were built for; rebuild with fluxrt build for other sizes)")


class FluxPipeline:
    def __init__(self, folder: ExportFolder, runners: Mapping[str, Runner]):
        missing = [s for s in STAGES if s not in runners]
        if missing:
            raise InvalidInputError(f"FluxPipeline needs runners for {list(STAGES)}; missing {missing}")
        self.folder = folder
        self.dims = folder.dims
        self.variant = folder.variant
        self.runners = {k: r.activate() for k, r in runners.items()}
        self.scheduler_config = folder.scheduler_config()
        vae = folder.vae_config()
        self.scaling_factor = float(vae.get("scaling_factor", 0.3611))
        self.shift_factor = float(vae.get("shift_factor", 0.1159) or 0.0)
        self.clip_tokenizer = PromptTokenizer.from_file(folder.tokenizer_path("clip"), "clip")
        self.t5_tokenizer = PromptTokenizer.from_file(folder.tokenizer_path("t5"), "t5")

    @classmethod
    def load(cls, path: str | Path, backend: str | Mapping[str, str] | None = None,
             cuda_graph: bool = False) -> "FluxPipeline":
        """``path``: an export folder (fluxrt export) or an engine folder (fluxrt build).
        ``backend``: one name for every stage, or a mapping stage -> name for a mixed setup;
        default ``ort-cpu`` for export folders, ``trt`` for engine folders. ``cuda_graph``: replay
        the transformer (called once per step with the same shapes) from a CUDA graph captured
        per shape; needs the transformer on ``ort-cuda``."""
        folder = open_folder(path)
        default = "trt" if hasattr(folder, "verify_plan") else "ort-cpu"
        backend = default if backend is None else backend
        choice = {s: backend for s in STAGES} if isinstance(backend, str) else dict(backend)
        unknown = sorted(set(choice) - set(STAGES))
        if unknown:
            raise InvalidInputError(f"backend mapping names unknown stages {unknown}; stages are {list(STAGES)}")
        choice = {s: choice.get(s, default) for s in STAGES}
        if cuda_graph and choice["transformer"] != "ort-cuda":
            raise InvalidInputError(f"cuda_graph replays the ort-cuda transformer; the transformer's backend is "
                                    f"{choice['transformer']!r}")
        return cls(folder, {s: make_runner(folder, s, choice[s], cuda_graph=cuda_graph and s == "transformer")
                            for s in STAGES})

    # ---- parameters ----------------------------------------------------------------------------
    def resolve(self, prompt, height, width, num_inference_steps, guidance_scale, max_sequence_length,
                num_images_per_prompt, seed, latents) -> dict:
        d = DEFAULTS[self.variant]
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidInputError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        height = 1024 if height is None else height
        width = 1024 if width is None else width
        multiple = 2 * self.dims.vae_scale_factor
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v % multiple:
                raise InvalidInputError(f"{name} must be a positive multiple of {multiple} pixels, got {v!r}")
        steps = d["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
            raise InvalidInputError(f"num_inference_steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")
        if self.variant == "schnell":
            if guidance_scale is not None:
                warnings.warn("FLUX.1-schnell has no guidance input: guidance_scale "
                              f"{guidance_scale!r} is ignored", GuidanceIgnoredWarning, stacklevel=3)
            guidance = None
        else:
            guidance = d["guidance_scale"] if guidance_scale is None else guidance_scale
            if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.floating, np.integer)) \
                    or not abs(guidance) <= float(np.finfo(np.float32).max):  # the transformer takes float32
                raise InvalidInputError(f"guidance_scale must be a finite number, got {guidance_scale!r} (float32: "
                                        f"magnitude at most 3.4e38)")
            guidance = float(guidance)
        max_len = d["max_sequence_length"] if max_sequence_length is None else max_sequence_length
        if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) \
                or not 1 <= max_len <= self.dims.t5_max_length:
            raise InvalidInputError(f"max_sequence_length must be an integer in [1, {self.dims.t5_max_length}], "
                                    f"got {max_sequence_length!r}")
        n = num_images_per_prompt
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InvalidInputError(f"num_images_per_prompt must be a positive integer, got {n!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                                 or not 0 <= seed <= MAX_SEED):
            raise InvalidInputError(f"seed must be an integer in [0, 2**64 - 1], got {seed!r}")
        envelope = getattr(self.folder, "envelope", None)  # engine folders: the shapes the plans accept
        if envelope is not None:
            check_envelope(envelope, len(prompts) * n, height, width, max_len)
        return dict(prompts=prompts, height=int(height), width=int(width), num_inference_steps=int(steps),
                    guidance_scale=guidance, max_sequence_length=int(max_len), num_images_per_prompt=int(n),
                    seed=seed)

    def check_latents(self, latents: Array, batch: int, height: int, width: int) -> Array:
        h, w = sampling.latent_size(height, width, self.dims.vae_scale_factor)
        want = (batch, (h // 2) * (w // 2), self.dims.in_channels)
        if not hasattr(latents, "shape") or not hasattr(latents, "dtype"):
            raise InvalidInputError(f"latents must be a numpy (or cupy) array of shape {want}, got "
                                    f"{type(latents).__name__}")
        if tuple(latents.shape) != want:
            raise InvalidInputError(f"latents have shape {tuple(latents.shape)}, expected {want} (diffusers' packed "
                                    f"layout for batch {batch} at {height}x{width})")
        if str(latents.dtype) not in ("float32", "float16", "bfloat16", "float64"):
            raise InvalidInputError(f"latents have dtype {latents.dtype}, expected a floating dtype")
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused just below
            latents = latents.astype(np.float32)
        if not bool(array_module(latents).isfinite(latents).all()):
            raise InvalidInputError("latents contain NaN or Inf")
        return latents

    # ---- stages --------------------------------------------------------------------------------
    def run(self, stage: str, feed: dict) -> dict:
        runner = self.runners[stage]
        feed = {k: self.to_device(runner, v) for k, v in feed.items()}
        out = runner.infer(feed)
        for name, value in out.items():
            if str(value.dtype) != "int32" and not bool(array_module(value).isfinite(dtypes.to_float32(value)).all()):
                raise NumericError(f"stage {stage} ({runner.backend}, {runner.precision}) produced NaN or Inf in "
                                   f"{name!r}; at {runner.precision} this usually means an overflow: "
                                   f"try bf16 or fp32")
        return out

    @staticmethod
    def to_device(runner: Runner, x: Array) -> Array:
        if runner.device == "cuda" and array_module(x) is np:
            import cupy

            return cupy.asarray(x)
        if runner.device == "cpu" and array_module(x) is not np:
            return x.get()
        return x

    def cast(self, stage: str, x: Array, name: str) -> Array:
        return dtypes.cast(x, self.runners[stage].input_dtype(name))

    def encode_prompts(self, prompts: list[str], max_len: int) -> tuple[Array, Array]:
        clip_ids = self.clip_tokenizer.encode(prompts, self.dims.clip_max_length)  # [B, 77] int32
        t5_ids = self.t5_tokenizer.encode(prompts, max_len)  # [B, S] int32
        pooled = self.run("clip", {"input_ids": clip_ids})["pooled_embeddings"]  # [B, 768]
        text = self.run("t5", {"input_ids": t5_ids})["text_embeddings"]  # [B, S, 4096]
        return pooled, text

    def __call__(self, prompt: str | Sequence[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 max_sequence_length: int | None = None, num_images_per_prompt: int = 1,
                 latents: Array | None = None, output_type: str = "pil", seed: int | None = None,
                 callback: Callable[[int, int], None] | None = None) -> FluxPipelineOutput:
        if output_type not in ("pil", "np"):
            raise InvalidInputError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        p = self.resolve(prompt, height, width, num_inference_steps, guidance_scale, max_sequence_length,
                         num_images_per_prompt, seed, latents)
        n, batch = p["num_images_per_prompt"], len(p["prompts"]) * p["num_images_per_prompt"]
        if latents is not None:  # checked before any stage runs
            latents = self.check_latents(latents, batch, p["height"], p["width"])
        pooled, text = self.encode_prompts(p["prompts"], p["max_sequence_length"])
        xp = np if self.runners["transformer"].device == "cpu" else array_module(pooled)
        pooled, text = xp.repeat(pooled, n, axis=0), xp.repeat(text, n, axis=0)  # prompt-major, as diffusers
        if latents is None:
            seed = p["seed"] if p["seed"] is not None else int(np.random.SeedSequence().entropy % MAX_SEED)
            p["seed"] = seed
            noise = sampling.initial_noise(seed, batch, p["height"], p["width"], self.dims.latent_channels,
                                           self.dims.vae_scale_factor)  # [B, 16, h, w]
            latents = sampling.pack_latents(noise)  # [B, N, 64]
        latents = self.to_device(self.runners["transformer"], latents)
        image = self.denoise(latents, pooled, text, p, callback)
        return FluxPipelineOutput(images=self.postprocess(image, output_type), settings=p)

    def denoise(self, latents: Array, pooled: Array, text: Array, p: dict, callback=None) -> Array:
        """Euler loop then VAE decode: images [B, 3, H, W] in [-1, 1]."""
        return self.decode(self.denoise_latents(latents, pooled, text, p, callback), p)

    def denoise_latents(self, latents: Array, pooled: Array, text: Array, p: dict, callback=None) -> Array:
        """The flow-match Euler loop over packed latents [B, N, 64], accumulated in float32."""
        seq_len = latents.shape[1]
        sigmas = sampling.get_sigmas(p["num_inference_steps"], seq_len, self.scheduler_config)  # [steps + 1]
        batch = latents.shape[0]
        feed = {
            "encoder_hidden_states": self.cast("transformer", text, "encoder_hidden_states"),
            "pooled_projections": self.cast("transformer", pooled, "pooled_projections"),
            "img_ids": sampling.image_ids(p["height"], p["width"], self.dims.vae_scale_factor),
            "txt_ids": sampling.text_ids(text.shape[1]),
        }
        if self.dims.guidance:
            feed["guidance"] = np.full((batch,), p["guidance_scale"], dtype=np.float32)
        steps = p["num_inference_steps"]
        # everything the loop feeds goes to the runner's device once, before the first step
        runner = self.runners["transformer"]
        timesteps = np.repeat(sigmas[:steps, None], batch, axis=1).astype(np.float32)  # [steps, B]
        feed = {k: self.to_device(runner, v) for k, v in feed.items()}
        timesteps = self.to_device(runner, timesteps)
        for i in range(steps):
            feed["hidden_states"] = self.cast("transformer", latents, "hidden_states")
            feed["timestep"] = timesteps[i]
            velocity = dtypes.to_float32(self.run("transformer", feed)["latent"])  # [B, N, 64]
            latents = sampling.euler_step(latents, velocity, float(sigmas[i]), float(sigmas[i + 1]))
            if callback is not None:
                callback(i + 1, steps)
        return latents

    def decode(self, latents: Array, p: dict) -> Array:
        latents = sampling.unpack_latents(latents, p["height"], p["width"], self.dims.vae_scale_factor)
        latents = sampling.decode_latents_scale(latents, self.scaling_factor, self.shift_factor)  # [B, 16, h, w]
        return self.run("vae_decoder", {"latent": self.cast("vae_decoder", latents, "latent")})["images"]

    @staticmethod
    def postprocess(images: Array, output_type: str):
        if array_module(images) is not np:
            images = dtypes.to_float32(images).get()
        uint8 = sampling.to_uint8_images(images.astype(np.float32))  # [B, H, W, 3]
        if output_type == "np":
            return np.clip(images.astype(np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
        from PIL import Image

        return [Image.fromarray(x) for x in uint8]


def progress_bar(prefix: str) -> Callable[[int, int], None]:
    def show(i: int, total: int) -> None:
        print(f"\r{prefix} step {i}/{total}", end="\n" if i == total else "", file=sys.stderr, flush=True)

    return show


__all__ = ["FluxPipeline", "FluxPipelineOutput", "GuidanceIgnoredWarning"]
