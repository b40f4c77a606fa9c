"""One pipeline behind the images API: loaded and warmed once, called by the batcher's thread, measured.

States: ``loading`` (the pipeline is being loaded and warmed: 503), ``ready``, ``draining`` (SIGTERM: no new
requests, 503; the accepted ones finish), ``failed`` (loading failed: 503 naming the error; the process
exits with it).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fluxrt.errors import FluxRTError, InvalidInputError, NumericError
from fluxrt.runtime import memory
from fluxrt.runtime.backends import check_optional
from fluxrt.runtime.params import GuidanceIgnoredWarning, InitImage
from fluxrt.runtime.png import generation_settings, png_bytes
from fluxrt.serve.batching import Batcher, Job
from fluxrt.serve.metrics import Metrics
from fluxrt.serve.requests import ApiError, ImageRequest, image_request

log = logging.getLogger("fluxrt.serve")


@dataclass(frozen=True)
class Generated:
    """One request's answer: its images (PIL), what their PNGs record, and the seconds of the pipeline call that
    made them (the call a direct ``FluxPipeline`` user makes: generate and the PIL images; shared when the request
    was batched). The PNGs are made by :meth:`pngs` on the request's own side, off the pipeline's thread (zlib lets
    go of the GIL: the next call runs meanwhile). The HTTP answer reports the call as ``Server-Timing:
    generate;dur=MS`` beside the server's other phases, so a client can tell the server's overhead (all but the
    call) from the generation, request by request."""

    images: list
    settings: dict
    generate_s: float
    compress_level: int = 1

    def pngs(self) -> list[str]:
        """Base64 PNG files, one per image, each with the settings and its index."""
        return [base64.b64encode(png_bytes(image, self.settings, k, self.compress_level)).decode("ascii")
                for k, image in enumerate(self.images)]


@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 4  # images per pipeline call
    batch_wait_ms: float = 10.0
    queue_size: int = 64  # requests accepted and not yet running
    timeout_s: float = 300.0
    max_side: int = 2048  # pixels, either side of a requested size
    log_prompts: bool = False
    png_compress_level: int = 1  # zlib's 0-9 for the answers' PNGs: 1 is ~2.5x faster than PIL's 6 at 128 px

    def __post_init__(self) -> None:
        for name, lo in (("max_batch", 1), ("queue_size", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        for name in ("batch_wait_ms", "timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if isinstance(self.max_side, bool) or not isinstance(self.max_side, int) or self.max_side < 16:
            raise ValueError(f"max_side must be an integer >= 16, got {self.max_side!r}")
        if (isinstance(self.png_compress_level, bool) or not isinstance(self.png_compress_level, int)
                or not 0 <= self.png_compress_level <= 9):
            raise ValueError(f"png_compress_level must be an integer in 0..9, got {self.png_compress_level!r}")


def prompt_for_log(prompt: str, full: bool) -> str:
    if full:
        return repr(prompt)
    return f"<{len(prompt)} chars, sha256 {hashlib.sha256(prompt.encode()).hexdigest()[:12]}>"


class Service:
    """``load``: a function returning the pipeline (``FluxPipeline.load(...)``), run on a thread of its own so
    the server answers health checks while it loads; ``model``: what the PNGs record as the model."""

    def __init__(self, load: Callable[[], object], model: str, settings: ServeSettings = ServeSettings(),
                 lora_choices: Sequence[Path] = ()):
        self.settings, self.model = settings, model
        self.lora_choices = lora_names(lora_choices)  # name -> file: what a request's lora field may name
        self.base_loras: list = []  # the pipeline's own (--lora), (file, scale) in load order
        self.applied: tuple = ()  # the request LoRAs merged now
        self.metrics = Metrics()
        self.state, self.error = "loading", None
        self.pipe = None
        self.batcher: Batcher | None = None
        self.load = load
        self.loader = threading.Thread(target=self.start, name="fluxrt-loader", daemon=True)

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self, batching: bool = True) -> None:
        """Load and warm the pipeline; with ``batching``, start fluxrt's batcher (Ray Serve brings its own)."""
        try:
            begin = time.perf_counter()
            self.pipe = self.load()
            self.base_loras = [(Path(lora.path), scale) for lora, scale in self.pipe.loras.values()]
            self.warm()
            max_batch = self.settings.max_batch
            if self.pipe.folder.kind == "engines":
                max_batch = min(max_batch, self.pipe.folder.envelope.batch[2])
            self.max_batch = max_batch
            if batching:
                self.batcher = Batcher(self.run, max_batch, self.settings.batch_wait_ms / 1000, self.settings.queue_size,
                                       on_batch=self.metrics.batch_size.observe)
            log.info("ready: %s loaded and warmed in %.1f s", self.model, time.perf_counter() - begin)
            if self.state == "loading":
                self.state = "ready"
        except Exception as e:  # noqa: BLE001 - reported by /readyz and by the server, which exits with it
            self.error = e if isinstance(e, FluxRTError) else RuntimeError(f"{type(e).__name__}: {e}")
            self.state = "failed"
            log.error("loading %s failed: %s", self.model, self.error)

    def warm(self) -> None:
        """One call of one step at the default size (inside an engine folder's envelope), so the first request
        does not pay for session set-up, kernel selection and (with --cuda-graph) the graph's capture."""
        pipe = self.pipe
        side = 1024
        if pipe.folder.kind == "engines":
            lo, _, hi = pipe.folder.envelope.image_side
            side = min(max(side, lo), hi)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GuidanceIgnoredWarning)
            p = pipe.params("warm-up", height=side, width=side, num_inference_steps=1, seed=0)
        pipe.generate(p)
        if "vae_encoder" in pipe.folder.components():  # image-to-image's encoder: its session made now too
            pipe.vae_encoder().activate()
        for name in self.lora_choices:  # each offered LoRA read against the model, and the swap made once
            self.use_loras(((name, 1.0),))
        self.use_loras(())

    def drain(self) -> None:
        """SIGTERM: refuse new requests; the accepted ones finish."""
        self.state = "draining"
        if self.batcher is not None:
            self.batcher.stop(drop_pending=False)

    def interrupt(self) -> None:
        """SIGINT: refuse new requests and answer the waiting ones 503 at once."""
        self.state = "draining"
        if self.batcher is not None:
            self.batcher.stop(drop_pending=True)

    def busy(self) -> int:
        return 0 if self.batcher is None else self.batcher.busy()

    # ---- requests ---------------------------------------------------------------------------------
    def check_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "loading":
            raise ApiError(503, "the model is still loading", type="server_error", headers={"Retry-After": "5"})
        if self.state == "failed":
            raise ApiError(503, f"the model failed to load: {self.error}", type="server_error")
        raise ApiError(503, "the server is shutting down", type="server_error")

    def accept(self, body: dict) -> ImageRequest:
        """The request ``body`` (parsed JSON) checked, its parameters made, its memory estimated: ApiError if not."""
        self.check_ready()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GuidanceIgnoredWarning)  # schnell: guidance_scale accepted, unused
            request = image_request(body, self.pipe.params, self.max_batch, self.settings.max_side,
                                    2 * self.pipe.dims.vae_scale_factor, self.lora_choices)
        if request.image is not None:
            try:
                check_optional(self.pipe.folder, "vae_encoder")
            except FluxRTError as e:
                raise ApiError(400, str(e), param="image") from None
        self.check_memory(request)
        return request

    def submit(self, body: dict) -> Job:
        request = self.accept(body)
        job = self.batcher.submit(request, self.settings.timeout_s)
        p = request.params
        log.info("accepted n=%d %dx%d steps=%d seed=%d prompt=%s", p.num_images_per_prompt, p.width, p.height,
                 p.num_inference_steps, p.seed, prompt_for_log(request.prompt, self.settings.log_prompts))
        return job

    def check_memory(self, request: ImageRequest) -> None:
        """The pipeline's memory estimate for this request alone, before it is queued (a call joining it with
        others is checked again when made)."""
        try:
            memory.check(self.pipe.folder, request.params, {k: r.device for k, r in self.pipe.runners.items()},
                         0 if request.image is None else request.image.count)
        except InvalidInputError as e:
            raise ApiError(400, str(e), param="size") from None

    # ---- the batcher's thread ---------------------------------------------------------------------
    def run(self, requests: Sequence[ImageRequest]) -> list[Generated]:
        """One pipeline call for ``requests`` (one batch key): each request's PNGs, base64, and the call's time. A lone request is the
        call ``fluxrt generate`` makes; several are one call whose noise is each request's own, in order (and,
        image-to-image, each image its own)."""
        pipe = self.pipe
        first = requests[0].params
        init = requests[0].image
        if len(requests) == 1:
            p, latents = first, None
        else:
            p = replace(first, prompts=tuple(r.prompt for r in requests for _ in range(r.n)),
                        num_images_per_prompt=1, seed=None)
            latents = np.concatenate([pipe.initial_latents(r.params) for r in requests])  # [B, N, 64]
            if init is not None:  # one image per prompt of the call: each request's, for each of its images
                init = InitImage(np.concatenate([np.repeat(r.image.pixels, r.n, axis=0) for r in requests]),
                                 init.strength)
        timings: dict[str, float] = {}
        try:
            self.use_loras(requests[0].loras)
            began = time.perf_counter()  # what a direct call does: generate and make the PIL images
            images = pipe.postprocess(pipe.generate(p, latents, timings=timings, image=init), "pil")
            generate_s = time.perf_counter() - began
        except NumericError as e:
            self.metrics.errors.labels(kind="numeric").inc()
            raise ApiError(500, f"generation failed: {e}", type="server_error") from None
        except Exception as e:  # noqa: BLE001 - a backend failure: the message names the stage
            self.metrics.errors.labels(kind="backend").inc()
            log.error("generation failed: %s: %s", type(e).__name__, e)
            raise ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error") from None
        for stage, seconds in timings.items():
            self.metrics.stage_seconds.labels(stage=stage).observe(seconds)
        out, i = [], 0
        for r in requests:
            settings = generation_settings(pipe, r.params, r.prompt, self.model)
            if r.image is not None:
                settings.update(r.image.to_json())
            out.append(Generated(images[i:i + r.n], settings, generate_s, self.settings.png_compress_level))
            i += r.n
        return out


    def use_loras(self, wanted: tuple) -> None:
        """The pipeline's LoRAs made the server's own followed by ``wanted`` ((name, scale), ...), in one merge,
        when they differ from what is merged now: the images are those of a pipeline loaded with exactly these
        files (``fluxrt generate --lora ...``)."""
        if wanted == self.applied:
            return
        self.pipe.set_loras(self.base_loras + [(self.lora_choices[name], scale) for name, scale in wanted])
        self.applied = wanted


def lora_names(files: Sequence[Path]) -> dict[str, Path]:
    """``--lora-choice`` files by name (their stems), which must differ."""
    names: dict[str, Path] = {}
    for f in files:
        f = Path(f)
        if f.stem in names:
            raise InvalidInputError(f"--lora-choice {f} and {names[f.stem]} have the same name {f.stem!r} (the file's "
                                    f"stem, what requests name): rename one")
        names[f.stem] = f
    return names


def load_pipeline(path: Path, backend: str | None, cuda_graph: bool, loras=()) -> Callable[[], object]:
    def load():
        from fluxrt.runtime import FluxPipeline

        return FluxPipeline.load(path, backend=backend, cuda_graph=cuda_graph, loras=loras)

    return load
