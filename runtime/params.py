"""The parameters of one text-to-image call, as a frozen dataclass validated on construction.

:meth:`GenerationParams.resolve` takes the keyword names diffusers' ``FluxPipeline`` uses, fills in
the variant's published defaults and checks what depends on the model (image sizes, text length,
guidance); construction itself checks every field's type and range and names the field.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np

from fluxrt.components import VARIANT_DEFAULTS, ModelDims
from fluxrt.errors import InvalidInputError

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
