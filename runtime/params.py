"""The parameters of one generation call, as frozen dataclasses validated on construction.

:meth:`GenerationParams.resolve` takes the keyword names diffusers' ``FluxPipeline`` uses, fills in
the variant's published defaults and checks what depends on the model (image sizes, text length,
guidance); construction itself checks every field's type and range and names the field.
:class:`InitImage` is what an image-to-image call adds: the images it starts from and the strength.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from fluxrt.components import VARIANT_DEFAULTS, ModelDims
from fluxrt.errors import InvalidInputError
from fluxrt.runtime import sampling

MAX_STEPS = 1000
MAX_SEED = 2**64 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)


class GuidanceIgnoredWarning(UserWarning):
    """A guidance scale was given for FLUX.1-schnell, which has no guidance input."""


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclass(frozen=True)
class GenerationParams:
    prompts: tuple[str, ...]
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float | None  # None: the model has no guidance input (schnell)
    max_sequence_length: int
    num_images_per_prompt: int = 1
    seed: int | None = None  # None: the pipeline draws one and reports it

    def __post_init__(self) -> None:
        if not isinstance(self.prompts, tuple) or not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise InvalidInputError(f"prompt must be a string or a non-empty list of strings, got {self.prompts!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if not is_int(v) or v <= 0:
                raise InvalidInputError(f"{name} must be a positive integer number of pixels, got {v!r}")
        if not is_int(self.num_inference_steps) or not 1 <= self.num_inference_steps <= MAX_STEPS:
            raise InvalidInputError(f"num_inference_steps must be an integer in [1, {MAX_STEPS}], "
                                    f"got {self.num_inference_steps!r}")
        g = self.guidance_scale
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float, np.floating, np.integer))
                              or not abs(g) <= FLOAT32_MAX):  # the transformer takes float32
            raise InvalidInputError(f"guidance_scale must be a finite number, got {g!r} (float32: magnitude at "
                                    f"most 3.4e38)")
        if not is_int(self.max_sequence_length) or self.max_sequence_length < 1:
            raise InvalidInputError(f"max_sequence_length must be a positive integer, got {self.max_sequence_length!r}")
        if not is_int(self.num_images_per_prompt) or self.num_images_per_prompt < 1:
            raise InvalidInputError(f"num_images_per_prompt must be a positive integer, got "
                                    f"{self.num_images_per_prompt!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidInputError(f"seed must be an integer in [0, 2**64 - 1], got {self.seed!r}")

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    @classmethod
    def resolve(cls, dims: ModelDims, prompt, height=None, width=None, num_inference_steps=None,
                guidance_scale=None, max_sequence_length=None, num_images_per_prompt=1,
                seed=None) -> "GenerationParams":
        """A call's arguments with the variant's defaults filled in, checked against the model."""
        d = VARIANT_DEFAULTS[dims.variant]
        prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt) if isinstance(prompt, (list, tuple)) else None
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidInputError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        for i, text in enumerate(prompts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate: not text the tokenizers can take
                raise InvalidInputError(f"prompt {i} is not valid Unicode text: {text[e.start:e.end]!r} at character "
                                        f"{e.start}") from None
        height = 1024 if height is None else height
        width = 1024 if width is None else width
        multiple = 2 * dims.vae_scale_factor
        for name, v in (("height", height), ("width", width)):
            if not is_int(v) or v <= 0 or v % multiple:
                raise InvalidInputError(f"{name} must be a positive multiple of {multiple} pixels, got {v!r}")
        if dims.guidance:
            guidance = d["guidance_scale"] if guidance_scale is None else guidance_scale
        else:
            if guidance_scale is not None:
                warnings.warn(f"FLUX.1-schnell has no guidance input: guidance_scale {guidance_scale!r} is ignored",
                              GuidanceIgnoredWarning, stacklevel=3)
            guidance = None
        max_len = d["max_sequence_length"] if max_sequence_length is None else max_sequence_length
        if not is_int(max_len) or not 1 <= max_len <= dims.t5_max_length:
            raise InvalidInputError(f"max_sequence_length must be an integer in [1, {dims.t5_max_length}], "
                                    f"got {max_sequence_length!r}")
        p = cls(prompts=prompts, height=height, width=width,
                num_inference_steps=d["num_inference_steps"] if num_inference_steps is None else num_inference_steps,
                guidance_scale=guidance, max_sequence_length=max_len, num_images_per_prompt=num_images_per_prompt,
                seed=seed)
        # plain Python numbers from here on (numpy integers are accepted as arguments)
        return cls(prompts=p.prompts, height=int(p.height), width=int(p.width),
                   num_inference_steps=int(p.num_inference_steps),
                   guidance_scale=None if guidance is None else float(guidance),
                   max_sequence_length=int(p.max_sequence_length), num_images_per_prompt=int(p.num_images_per_prompt),
                   seed=None if seed is None else int(seed))

    def to_json(self) -> dict:
        return dict(asdict(self), prompts=list(self.prompts))


# ---- image-to-image ---------------------------------------------------------------------------------

DEFAULT_STRENGTH = 0.6  # diffusers' FluxImg2ImgPipeline default


def check_strength(strength) -> float:
    """``strength`` as a float: a finite number in [0, 1] (diffusers refuses values outside)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.integer, np.floating)) \
            or not 0 <= strength <= 1:
        raise InvalidInputError(f"strength must be a finite number in [0, 1], got {strength!r}")
    return float(strength)


def image_pixels(image) -> np.ndarray:
    """``image`` (see :class:`InitImage`) as one float32 array [K, H, W, 3]."""
    listed = isinstance(image, (list, tuple))
    items = list(image) if listed else [image]
    if not items:
        raise InvalidInputError("image must be an image or a non-empty list of images, got an empty list")
    arrays = [one_image(item, f"image[{i}]" if listed else "image", batch_ok=not listed)
              for i, item in enumerate(items)]
    sizes = sorted({a.shape[1:3] for a in arrays})
    if len(sizes) > 1:
        raise InvalidInputError(f"image holds images of different sizes {sizes} (height, width); all must have the "
                                f"call's size")
    return np.ascontiguousarray(np.concatenate(arrays))


def one_image(item, where: str, batch_ok: bool) -> np.ndarray:
    """One item of ``image`` as float32 [K, H, W, 3]: a PIL RGB image (``asarray / 255``, as diffusers converts
    it), or a float32 array [H, W, 3] (or [K, H, W, 3] where ``batch_ok``)."""
    pil = sys.modules.get("PIL.Image")  # an object can only be a PIL image if PIL was imported to make it
    if pil is not None and isinstance(item, pil.Image):
        if item.mode != "RGB":
            raise InvalidInputError(f"{where} is a PIL image in mode {item.mode!r}, expected 'RGB' (convert it "
                                    f"with image.convert('RGB'))")
        return (np.array(item).astype(np.float32) / 255.0)[None]
    ranks = "[H, W, 3] or [B, H, W, 3]" if batch_ok else "[H, W, 3]"
    if not isinstance(item, np.ndarray):
        raise InvalidInputError(f"{where} must be a PIL RGB image or a float32 numpy array {ranks} with values in "
                                f"[0, 1], got {type(item).__name__}")
    if item.dtype != np.float32:
        raise InvalidInputError(f"{where} has dtype {item.dtype}, expected float32 with values in [0, 1] (8-bit "
                                f"pixels: divide by 255, or pass a PIL image)")
    if item.ndim not in ((3, 4) if batch_ok else (3,)) or item.shape[-1] != 3 or 0 in item.shape:
        raise InvalidInputError(f"{where} has shape {tuple(item.shape)}, expected {ranks}: RGB, channels last")
    return item[None] if item.ndim == 3 else item


@dataclass(frozen=True, eq=False)
class InitImage:
    """What an image-to-image call starts from: ``pixels`` float32 [K, H, W, 3] in [0, 1], K = 1 (one image for
    every prompt) or one per prompt, and ``strength`` in [0, 1]: how much noise covers the image's latents, so how
    many of the schedule's steps run (:func:`sampling.start_step`). Build it with :meth:`from_input`."""

    pixels: np.ndarray
    strength: float = DEFAULT_STRENGTH

    def __post_init__(self) -> None:
        x = self.pixels
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4 or x.shape[-1] != 3 or 0 in x.shape:
            raise InvalidInputError(f"image pixels must be a float32 array [K, H, W, 3], got "
                                    f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        bad = [i for i in range(x.shape[0]) if not np.isfinite(x[i]).all()]
        if bad:
            raise InvalidInputError(f"image contains NaN or Inf (image {bad[0]} of {x.shape[0]})")
        low, high = float(x.min()), float(x.max())
        if low < 0 or high > 1:
            raise InvalidInputError(f"image has values in [{low:g}, {high:g}], expected [0, 1] (fluxrt does not clamp)")
        check_strength(self.strength)

    @classmethod
    def from_input(cls, image, strength=DEFAULT_STRENGTH) -> "InitImage":
        """``image``: a PIL RGB image, a float32 array [H, W, 3] in [0, 1], a float32 array [K, H, W, 3], or a list
        of PIL images and [H, W, 3] arrays, all of one size."""
        return cls(image_pixels(image), check_strength(strength))

    @property
    def count(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[2])

    @property
    def sha256(self) -> str:
        """Of the float32 [K, H, W, 3] array's bytes (C order)."""
        return hashlib.sha256(self.pixels.tobytes()).hexdigest()

    def sizes(self, height, width, multiple: int) -> tuple:
        """The call's height and width: those given, else the image's (which must then be a multiple of
        ``multiple`` pixels)."""
        for name, given, own in (("height", height, self.height), ("width", width, self.width)):
            if given is None and own % multiple:
                raise InvalidInputError(f"image is {self.height}x{self.width} pixels (height x width); the call takes "
                                        f"its {name} from it, and {name} must be a multiple of {multiple} pixels: crop "
                                        f"or resize the image")
        return (self.height if height is None else height, self.width if width is None else width)

    def start_step(self, num_steps: int) -> int:
        return sampling.start_step(num_steps, self.strength)

    def check(self, p: GenerationParams) -> None:
        """The image against the call: its size, how many there are, and that a step runs."""
        if (self.height, self.width) != (p.height, p.width):
            raise InvalidInputError(f"image is {self.height}x{self.width} pixels (height x width), but the call asks "
                                    f"for {p.height}x{p.width}: fluxrt does not resize; give the image at that size, "
                                    f"or leave height and width out to take the image's")
        if self.count not in (1, len(p.prompts)):
            raise InvalidInputError(f"image holds {self.count} images; give one (for every prompt) or one per prompt "
                                    f"({len(p.prompts)})")
        start = self.start_step(p.num_inference_steps)
        if start >= p.num_inference_steps:
            raise InvalidInputError(f"strength {self.strength!r} runs none of the {p.num_inference_steps} denoising "
                                    f"steps (image-to-image starts at step {start} of {p.num_inference_steps}, the "
                                    f"rule of diffusers' get_timesteps, which refuses this too): give a strength "
                                    f"above 0")

    def to_json(self) -> dict:
        return {"strength": self.strength, "image_sha256": self.sha256}
