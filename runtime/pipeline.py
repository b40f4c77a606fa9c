"""The FLUX.1 pipeline over any runners: tokenize, encode, Euler loop, decode; text-to-image, and
image-to-image when the call gives an ``image`` (diffusers' ``FluxImg2ImgPipeline``: the image's latents
under noise at the strength's step, then the schedule's remaining steps).

Host code only (numpy, or cupy when the runners live on a GPU); no torch.  The call takes the
keyword names diffusers' ``FluxPipeline`` uses for the same things; the work is done by the free
functions of ``loop.py``.  The VAE encoder, which only image-to-image needs, gets its runner on the first
call with an image (or at load with ``vae_encoder=True``).  LoRA files load and unload in any order
(``load_lora``, ``unload_lora``): the transformer's runner merges the ones loaded, in load order, into its
own weights each time.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fluxrt import dtypes
from fluxrt.artifacts import ModelFolder, check_envelope, open_folder
from fluxrt.components import STAGES, VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR
from fluxrt.dtypes import Array, array_module
from fluxrt.errors import ExportError, InvalidInputError
from fluxrt.lora import LoraFile, read_lora
from fluxrt.runner import Runner
from fluxrt.runtime import loop, memory, sampling
from fluxrt.runtime.backends import DEFAULT_BACKEND, BackendOptions, make_runner, make_runners, stage_backends
from fluxrt.runtime.ort import MAX_CUDA_GRAPHS
from fluxrt.runtime.params import (DEFAULT_STRENGTH, MAX_SEED, GenerationParams, GuidanceIgnoredWarning, InitImage,
                                   check_strength)
from fluxrt.runtime.tokenizer import PromptTokenizer


def vae_number(config: dict, key: str, default: float, folder: ModelFolder, nonzero: bool = False) -> float:
    """A VAE factor from the folder's vae/config.json: a finite number (absent: FLUX's value)."""
    value = config.get(key, default)
    if value is None and key == "shift_factor":
        value = 0.0
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and np.isfinite(value)
    if not ok or (nonzero and value == 0):
        raise ExportError(f"{folder.root / 'vae' / 'config.json'}: {key} must be a finite{' non-zero' if nonzero else ''} "
                          f"number, got {value!r}")
    return float(value)


@dataclass
class FluxPipelineOutput:
    images: Any  # list of PIL images, or float32 [B, H, W, 3] in [0, 1] for output_type="np"
    # the call's GenerationParams, seed included; image-to-image adds strength and image_sha256 (InitImage.to_json)
    settings: dict = field(default_factory=dict)
    # wall seconds per stage: clip, t5 (tokenizing included), vae_encoder (image-to-image only), transformer
    # (the whole denoising loop), vae_decoder; and total
    timings: dict = field(default_factory=dict)


class FluxPipeline:
    def __init__(self, folder: ModelFolder, runners: Mapping[str, Runner],
                 loras: Sequence[tuple[str | Path, float]] = (), encoder_backend: str | None = None,
                 backend_options: BackendOptions = BackendOptions()):
        """``runners``: one per stage (``fluxrt.components.STAGES``), of any backends, and optionally one for the
        ``vae_encoder``; activated here, after the ``(file, scale)`` pairs of ``loras`` are loaded (see
        ``load_lora``; one session for all of them). Without a ``vae_encoder`` runner, the first call with an image
        makes one on ``encoder_backend`` (default: the folder's default backend) with ``backend_options``."""
        missing = [s for s in STAGES if s not in runners]
        if missing:
            raise InvalidInputError(f"FluxPipeline needs runners for {list(STAGES)}; missing {missing}")
        self.folder = folder
        self.dims = folder.dims
        self.variant = folder.variant
        self.scheduler_config = folder.scheduler_config()
        vae = folder.vae_config()
        self.scaling_factor = vae_number(vae, "scaling_factor", VAE_SCALING_FACTOR, folder, nonzero=True)
        self.shift_factor = vae_number(vae, "shift_factor", VAE_SHIFT_FACTOR, folder)
        self.clip_tokenizer = PromptTokenizer.from_file(folder.tokenizer_path("clip"), "clip")
        self.t5_tokenizer = PromptTokenizer.from_file(folder.tokenizer_path("t5"), "t5")
        self.runners = dict(runners)
        self.encoder_backend = encoder_backend or DEFAULT_BACKEND[folder.kind]
        self.backend_options = backend_options
        self._encoder_lock = threading.Lock()
        self._loras: dict[str, tuple[LoraFile, float]] = {}  # name -> (file, scale), in load order
        self._loads = 0  # load_lora calls that succeeded: the next name's number
        for path, scale in loras:
            self.load_lora(path, scale)
        self.runners = {k: r.activate() for k, r in self.runners.items()}

    @classmethod
    def load(cls, path: str | Path, backend: str | Mapping[str, str] | None = None, cuda_graph: bool = False,
             max_cuda_graphs: int = MAX_CUDA_GRAPHS, runners: Mapping[str, Runner] | None = None,
             loras: Sequence[tuple[str | Path, float]] = (), vae_encoder: bool = False) -> "FluxPipeline":
        """``path``: an export folder (fluxrt export) or an engine folder (fluxrt build).
        ``backend``: one name for every stage, or a mapping stage -> name for a mixed setup;
        default ``ort-cpu`` for export folders, ``trt`` for engine folders. ``cuda_graph``: replay
        the transformer (called once per step with the same shapes) from a CUDA graph captured
        per shape, up to ``max_cuda_graphs`` shapes; needs the transformer on ``ort-cuda``.
        ``runners``: ready-made runners for some stages (the torch reference backend, a recording
        wrapper), used instead of making them from ``backend``. ``loras``: ``(file, scale)`` pairs loaded
        before the first session is made (``load_lora``). ``vae_encoder``: make and load the VAE encoder
        (image-to-image) now, on its stage's backend, rather than on the first call with an image."""
        folder = open_folder(path)
        given = dict(runners or {})
        options = BackendOptions(cuda_graph, max_cuda_graphs)
        stages = STAGES + (("vae_encoder",) if vae_encoder else ())
        made = make_runners(folder, backend, options, skip=tuple(given), stages=stages)
        encoder_backend = stage_backends(folder, backend, ("vae_encoder",))["vae_encoder"]
        return cls(folder, {**made, **given}, loras, encoder_backend, options)

    # ---- LoRA ----------------------------------------------------------------------------------
    @property
    def loras(self) -> dict[str, tuple[LoraFile, float]]:
        """The loaded LoRAs in load order: name -> (file, scale)."""
        return dict(self._loras)

    def load_lora(self, path: str | Path, scale: float = 1.0) -> str:
        """Merge the LoRA file at ``path`` (diffusers/peft or kohya layout, see ``fluxrt.lora``) into the
        transformer at ``scale`` (what diffusers' ``set_adapters`` weight means), over the ones loaded before;
        returns its name, a new one on every call, for ``unload_lora``. Images are then those of a fresh
        pipeline given the same files in the same order at the same scales, bit for bit."""
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise InvalidInputError(f"LoRA scale must be a finite number, got {scale!r}")
        lora = read_lora(path, self.folder.transformer_config())
        name = f"{Path(path).stem or 'lora'}-{self._loads + 1}"
        self._set_loras({**self._loras, name: (lora, float(scale))})
        self._loads += 1
        return name

    def set_loras(self, loras: Sequence[tuple[str | Path, float]]) -> list[str]:
        """Exactly the LoRAs ``loras`` ((file, scale), ...), in that order, in place of those loaded: one merge (one
        new session on ONNX Runtime) however many change; the images those of a fresh pipeline loaded with them.
        Returns their names, as ``load_lora`` gives them."""
        read = []
        for path, scale in loras:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
                raise InvalidInputError(f"LoRA scale must be a finite number, got {scale!r}")
            read.append((path, read_lora(path, self.folder.transformer_config()), float(scale)))
        named = {}
        for k, (path, lora, scale) in enumerate(read):
            named[f"{Path(path).stem or 'lora'}-{self._loads + k + 1}"] = (lora, scale)
        self._set_loras(named)
        self._loads += len(read)
        return list(named)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove the LoRA ``name`` (a name ``load_lora`` returned), or every one with None: the transformer
        computes with the others exactly as if only they had been loaded, in their order."""
        if name is not None and name not in self._loras:
            raise InvalidInputError(f"no LoRA named {name!r} is loaded; the loaded ones are {list(self._loras)}")
        self._set_loras({k: v for k, v in self._loras.items() if name is not None and k != name})

    def _set_loras(self, loras: dict[str, tuple[LoraFile, float]]) -> None:
        if list(loras) != list(self._loras):
            self.runners["transformer"].set_loras(list(loras.values()))
            self._loras = loras

    # ---- parameters ----------------------------------------------------------------------------
    def params(self, prompt, height=None, width=None, num_inference_steps=None, guidance_scale=None,
               max_sequence_length=None, num_images_per_prompt=1, seed=None) -> GenerationParams:
        """The call's parameters with the variant's defaults, checked against the model and, for an
        engine folder, the shapes its plans accept."""
        p = GenerationParams.resolve(self.dims, prompt, height, width, num_inference_steps, guidance_scale,
                                     max_sequence_length, num_images_per_prompt, seed)
        if self.folder.kind == "engines":
            check_envelope(self.folder.envelope, p.batch, p.height, p.width, p.max_sequence_length)
        return p

    def check_latents(self, latents: Array, p: GenerationParams) -> Array:
        h, w = sampling.latent_size(p.height, p.width, self.dims.vae_scale_factor)
        want = (p.batch, (h // 2) * (w // 2), self.dims.in_channels)
        if not hasattr(latents, "shape") or not hasattr(latents, "dtype"):
            raise InvalidInputError(f"latents must be a numpy (or cupy) array of shape {want}, got "
                                    f"{type(latents).__name__}")
        if tuple(latents.shape) != want:
            raise InvalidInputError(f"latents have shape {tuple(latents.shape)}, expected {want} (diffusers' packed "
                                    f"layout for batch {p.batch} at {p.height}x{p.width})")
        if str(latents.dtype) not in ("float32", "float16", "bfloat16", "float64"):
            raise InvalidInputError(f"latents have dtype {latents.dtype}, expected a floating dtype")
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused just below
            latents = latents.astype(np.float32)
        if not bool(array_module(latents).isfinite(latents).all()):
            raise InvalidInputError("latents contain NaN or Inf")
        return latents

    # ---- stages --------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], max_len: int,
                       timings: dict | None = None) -> tuple[Array, Array]:
        timings = {} if timings is None else timings
        start = time.perf_counter()
        clip_ids = self.clip_tokenizer.encode(list(prompts), self.dims.clip_max_length)  # [B, 77] int32
        pooled = loop.run_stage(self.runners["clip"], {"input_ids": clip_ids})["pooled_embeddings"]  # [B, 768]
        timings["clip"] = time.perf_counter() - start
        start = time.perf_counter()
        t5_ids = self.t5_tokenizer.encode(list(prompts), max_len)  # [B, S] int32
        text = loop.run_stage(self.runners["t5"], {"input_ids": t5_ids})["text_embeddings"]  # [B, S, 4096]
        timings["t5"] = time.perf_counter() - start
        return pooled, text

    def initial_latents(self, p: GenerationParams) -> np.ndarray:
        """Packed float32 noise [B, N, 64] from ``p.seed``."""
        noise = sampling.initial_noise(p.seed, p.batch, p.height, p.width, self.dims.latent_channels,
                                       self.dims.vae_scale_factor)  # [B, 16, h, w]
        return sampling.pack_latents(noise)

    def vae_encoder(self) -> Runner:
        """The VAE encoder's runner: the one given, or made on ``encoder_backend`` on first use (verified, loaded by
        its ``activate``); a folder without a vae_encoder graph or plan is refused by name."""
        with self._encoder_lock:
            if "vae_encoder" not in self.runners:
                self.runners["vae_encoder"] = make_runner(self.folder, "vae_encoder", self.encoder_backend,
                                                          self.backend_options)
            return self.runners["vae_encoder"]

    def image_latents(self, image: InitImage, p: GenerationParams, noise: Array, sigma: float,
                      timings: dict) -> Array:
        """Image-to-image's packed float32 start [B, N, 64]: ``sigma * noise + (1 - sigma) * pack(latents)``, the
        latents the VAE encoder's posterior mean of each image, shifted and scaled; an image for each prompt
        serves that prompt's ``num_images_per_prompt`` images (prompt-major), a single one every image."""
        encoder = self.vae_encoder().activate()
        start = time.perf_counter()
        encoded = loop.encode(encoder, image.pixels, self.scaling_factor, self.shift_factor)  # [K, 16, h, w]
        timings["vae_encoder"] = time.perf_counter() - start
        transformer = self.runners["transformer"]
        encoded = loop.to_device(transformer, encoded)
        encoded = array_module(encoded).repeat(encoded, p.batch // image.count, axis=0)  # [B, 16, h, w]
        return sampling.noised_latents(sampling.pack_latents(encoded), loop.to_device(transformer, noise), sigma)

    def generate(self, p: GenerationParams, latents: Array | None = None,
                 callback: Callable[[int, int], None] | None = None, timings: dict | None = None,
                 image: InitImage | None = None) -> Array:
        """Images [B, 3, H, W] in [-1, 1] for ``p`` (with a seed, or explicit packed ``latents``); refused before
        any stage runs when its memory estimate (``fluxrt.runtime.memory``) exceeds what is available.
        ``image``: image-to-image from it, ``latents`` (or the seed's) then being the noise (see ``__call__``).
        ``timings``: filled with the wall seconds of each stage (see FluxPipelineOutput.timings)."""
        if image is not None:
            image.check(p)
            self.vae_encoder()  # a folder without the encoder is refused before any stage runs
        memory.check(self.folder, p, {name: r.device for name, r in self.runners.items()},
                     0 if image is None else image.count)
        timings = {} if timings is None else timings
        begin = time.perf_counter()
        pooled, text = self.encode_prompts(p.prompts, p.max_sequence_length, timings)
        n = p.num_images_per_prompt
        xp = np if self.runners["transformer"].device == "cpu" else array_module(pooled)
        pooled, text = xp.repeat(pooled, n, axis=0), xp.repeat(text, n, axis=0)  # prompt-major, as diffusers
        if latents is None:
            latents = self.initial_latents(p)
        sigmas = sampling.get_sigmas(p.num_inference_steps, latents.shape[1], self.scheduler_config)  # [steps + 1]
        if image is not None:  # the text-to-image schedule's last steps, from the image's latents under noise
            first = image.start_step(p.num_inference_steps)
            latents = self.image_latents(image, p, latents, float(sigmas[first]), timings)
            sigmas = sigmas[first:]
        img_ids = sampling.image_ids(p.height, p.width, self.dims.vae_scale_factor)
        start = time.perf_counter()
        latents = loop.denoise(self.runners["transformer"], latents, pooled, text, img_ids, sigmas,
                               p.guidance_scale, callback)
        timings["transformer"] = time.perf_counter() - start
        start = time.perf_counter()
        images = loop.decode(self.runners["vae_decoder"], latents, p.height, p.width, self.dims.vae_scale_factor,
                             self.scaling_factor, self.shift_factor)
        timings["vae_decoder"] = time.perf_counter() - start
        timings["total"] = time.perf_counter() - begin
        return images

    def __call__(self, prompt: str | Sequence[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 max_sequence_length: int | None = None, num_images_per_prompt: int = 1,
                 latents: Array | None = None, output_type: str = "pil", seed: int | None = None,
                 callback: Callable[[int, int], None] | None = None, image: Any = None,
                 strength: float = DEFAULT_STRENGTH) -> FluxPipelineOutput:
        """Images for ``prompt`` (a string or a list: one batch, ``num_images_per_prompt`` each, prompt-major).

        Text-to-image from packed ``latents`` [B, N, 64] (diffusers' layout) or, without them, noise from
        ``seed`` (drawn and reported in ``settings`` when None).

        Image-to-image when ``image`` is given, with diffusers' ``FluxImg2ImgPipeline`` semantics: ``image`` is
        a PIL RGB image (taken as ``asarray / 255``), a float32 numpy array [H, W, 3] with values in [0, 1], a
        float32 array [K, H, W, 3], or a list of PIL images and [H, W, 3] arrays: one image for every prompt,
        or one per prompt (image i serves prompt i's ``num_images_per_prompt`` images). The image must be
        given at exactly ``height`` x ``width`` pixels: fluxrt never resizes it, an image of another size than
        an explicit height or width is refused, and a height or width left None is the image's. ``strength``,
        a number in [0, 1] (diffusers' default 0.6), picks the first step ``t = int(N - N * strength)`` of the
        ``num_inference_steps`` = N step text-to-image schedule ``sigmas``; the start is ``sigmas[t] * noise +
        (1 - sigmas[t]) * pack((E(2 * image - 1) - shift_factor) * scaling_factor)``, E the VAE encoder's
        posterior mean, and steps t .. N - 1 run. ``latents`` here are that packed noise [B, N, 64] (not a start
        latent, as diffusers takes them), from ``seed`` when not given, exactly as text-to-image's. Strength 1
        is text-to-image from the same noise; a strength that runs no step (0) is refused. Without an image
        ``strength`` is checked but has no effect.
        """
        if output_type not in ("pil", "np"):
            raise InvalidInputError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        if callback is not None and not callable(callback):
            raise InvalidInputError(f"callback must be a function of (step, steps) or None, got {callback!r}")
        check_strength(strength)
        init = None if image is None else InitImage.from_input(image, strength)
        if init is not None:
            height, width = init.sizes(height, width, 2 * self.dims.vae_scale_factor)
        p = self.params(prompt, height, width, num_inference_steps, guidance_scale, max_sequence_length,
                        num_images_per_prompt, seed)
        if init is not None:
            init.check(p)
        if latents is not None:  # checked before any stage runs; the seed, if any, is not used
            latents = self.check_latents(latents, p)
            p = replace(p, seed=None)
        elif p.seed is None:
            p = replace(p, seed=int(np.random.SeedSequence().entropy % MAX_SEED))
        timings: dict[str, float] = {}
        images = self.generate(p, latents, callback, timings, init)
        settings = p.to_json() if init is None else dict(p.to_json(), **init.to_json())
        return FluxPipelineOutput(images=self.postprocess(images, output_type), settings=settings, timings=timings)

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


__all__ = ["FluxPipeline", "FluxPipelineOutput", "GenerationParams", "GuidanceIgnoredWarning"]
