"""The body of ``POST /v1/images/generations``: read, checked field by field, and turned into the pipeline's
parameters; every refusal an :class:`ApiError` in OpenAI's error shape naming the field.

OpenAI's image API fields: ``prompt`` (required), ``n``, ``size`` ("WxH", width first), ``response_format``
(``b64_json`` only: the server keeps no files to link to), ``model`` and ``user`` (accepted, recorded, not
used).  fluxrt's own: ``seed`` (0..2**64-1; drawn and reported when absent), ``num_inference_steps``,
``guidance_scale``, ``max_sequence_length`` (the variant's defaults when absent), and for image-to-image
``image`` (a PNG, JPEG or WebP file, base64, optionally as a ``data:image/...;base64,`` URL; taken as RGB, an
alpha channel dropped; at exactly the requested size, or giving the size when ``size`` is absent: fluxrt never
resizes) with ``strength`` (0 < s <= 1, default 0.6, diffusers' meaning), and ``lora``: a list of
``{"name": NAME, "scale": S}`` (scale 1 when absent) naming LoRAs the server offers (``--lora-choice FILE``, NAME
the file's stem), applied after the server's own ``--lora`` files, in the order given.  Any other field is
refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import secrets
from dataclasses import dataclass

from fluxrt.errors import InvalidInputError
from fluxrt.runtime.params import DEFAULT_STRENGTH, MAX_SEED, GenerationParams, InitImage

MAX_BODY_BYTES = 1 << 20  # 1 MiB
FIELDS = ("prompt", "n", "size", "response_format", "model", "user", "seed", "num_inference_steps",
          "guidance_scale", "max_sequence_length", "image", "strength", "lora")
MAX_LORAS = 8
SIZE = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")
MAX_PROMPT_CHARS = 100_000  # far beyond what CLIP (77 tokens) and T5 (512) read; a body limit in characters


class ApiError(Exception):
    """A request the server answers with an error: HTTP ``status``, OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass(frozen=True)
class ImageRequest:
    """One request, checked; ``params`` are the pipeline's (defaults filled in, seed drawn when absent)."""

    params: GenerationParams
    prompt: str
    model: str | None = None
    user: str | None = None
    image: InitImage | None = None  # image-to-image
    loras: tuple = ()  # ((name, scale), ...) of the server's --lora-choice files

    @property
    def n(self) -> int:
        return self.params.num_images_per_prompt

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call."""
        p = self.params
        strength = None if self.image is None else self.image.strength  # image-to-image runs fewer steps
        return p.height, p.width, p.num_inference_steps, p.guidance_scale, p.max_sequence_length, strength, self.loras


def parse_body(raw: bytes) -> dict:
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is {len(raw)} bytes; at most {MAX_BODY_BYTES} are accepted",
                       param=None)
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(None, f"the request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise invalid(None, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise invalid(unknown[0], f"unknown field {unknown[0]!r}; the accepted fields are {list(FIELDS)}")
    return body


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def optional_int(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not is_int(v) or not lo <= v <= hi:
        raise invalid(name, f"{name} must be an integer in [{lo}, {hi}], got {json.dumps(v)}")
    return v


def parse_size(text) -> tuple[int, int]:
    """``"WxH"`` -> (width, height)."""
    m = SIZE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise invalid("size", f"size must be a string \"WIDTHxHEIGHT\" in pixels, e.g. \"1024x768\", got "
                              f"{json.dumps(text)}")
    return int(m.group(1)), int(m.group(2))


def param_of(message: str) -> str | None:
    """The request field a pipeline validation message is about (its messages start with the argument's name)."""
    for prefix, param in (("height", "size"), ("width", "size"), ("num_inference_steps", "num_inference_steps"),
                          ("guidance_scale", "guidance_scale"), ("max_sequence_length", "max_sequence_length"),
                          ("num_images_per_prompt", "n"), ("batch", "n"), ("seed", "seed"), ("prompt", "prompt"),
                          ("image", "image"), ("strength", "strength")):
        if message.startswith(prefix):
            return param
    if " image(s) at " in message:  # the memory estimate: the size and n together
        return "size"
    return None


DATA_URL = re.compile(r"data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


def init_image(body: dict) -> InitImage | None:
    """``image`` and ``strength`` as the pipeline's InitImage (None for text-to-image)."""
    strength = body.get("strength")
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float))):
        raise invalid("strength", f"strength must be a number in (0, 1], got {json.dumps(strength)[:80]}")
    text = body.get("image")
    if text is None:
        if strength is not None:
            raise invalid("strength", "strength sets how much of image is redrawn: it needs image")
        return None
    if not isinstance(text, str):
        raise invalid("image", f"image must be a base64 string (PNG, JPEG or WebP), got {type(text).__name__}")
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(DATA_URL.sub("", text, count=1), validate=True)
        with Image.open(io.BytesIO(raw)) as file:
            if file.format not in ("PNG", "JPEG", "WEBP"):
                raise invalid("image", f"image is a {file.format} file; PNG, JPEG or WebP are accepted")
            if file.width * file.height > 64 << 20:
                raise invalid("image", f"image is {file.width}x{file.height} pixels, too many to decode")
            pixels = file.convert("RGB")
    except (binascii.Error, ValueError) as e:
        raise invalid("image", f"image is not valid base64: {e}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise invalid("image", f"image cannot be decoded as PNG, JPEG or WebP: {e}") from None
    try:
        return InitImage.from_input(pixels, DEFAULT_STRENGTH if strength is None else strength)
    except InvalidInputError as e:
        raise invalid(param_of(str(e)) or "image", str(e)) from None


def lora_choice(body: dict, offered) -> tuple:
    """``lora`` -> ((name, scale), ...), each name one of ``offered``."""
    given = body.get("lora")
    if given is None:
        return ()
    if not isinstance(given, list) or len(given) > MAX_LORAS:
        raise invalid("lora", f"lora must be a list of at most {MAX_LORAS} objects {{\"name\": ..., \"scale\": ...}}, "
                              f"got {json.dumps(given)[:80]}")
    out = []
    for item in given:
        if not isinstance(item, dict) or set(item) - {"name", "scale"} or not isinstance(item.get("name"), str):
            raise invalid("lora", f"each lora entry must be {{\"name\": string, \"scale\": number}}, got "
                                  f"{json.dumps(item)[:80]}")
        if item["name"] not in offered:
            raise invalid("lora", f"lora {item['name']!r} is not offered by this server; it offers "
                                  f"{sorted(offered)} (fluxrt serve --lora-choice FILE)")
        scale = item.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise invalid("lora", f"lora {item['name']!r}: scale must be a finite number, got {json.dumps(scale)}")
        out.append((item["name"], float(scale)))
    return tuple(out)


def image_request(body: dict, resolve, max_n: int, max_side: int, multiple: int = 16,
                  offered_loras=()) -> ImageRequest:
    """Check ``body`` (see :func:`parse_body`) and make the pipeline parameters with ``resolve`` (the pipeline's
    ``params``: defaults, model and envelope checks), which raises InvalidInputError naming the argument;
    ``multiple``: the pixels an image's sides must be a multiple of when it gives the size."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise invalid("prompt", f"prompt must be a non-empty string, got {json.dumps(prompt)[:80]}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise invalid("prompt", f"prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    n = body.get("n", 1)
    if not is_int(n) or not 1 <= n <= max_n:
        raise invalid("n", f"n must be an integer in [1, {max_n}] (the server's --max-batch), got {json.dumps(n)}")
    width = height = None
    if body.get("size") is not None:
        width, height = parse_size(body["size"])
        if max(width, height) > max_side:
            raise invalid("size", f"size {width}x{height}: each side must be at most {max_side} pixels (the "
                                  f"server's --max-side)")
    fmt = body.get("response_format", "b64_json")
    if fmt != "b64_json":
        raise invalid("response_format", f"response_format must be \"b64_json\" (the server keeps no files to link "
                                         f"to), got {json.dumps(fmt)}")
    for name in ("model", "user"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise invalid(name, f"{name} must be a string, got {json.dumps(body[name])[:80]}")
    steps = optional_int(body, "num_inference_steps", 1, 1000)
    length = optional_int(body, "max_sequence_length", 1, 1 << 20)
    seed = optional_int(body, "seed", 0, MAX_SEED)
    guidance = body.get("guidance_scale")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance)):
        raise invalid("guidance_scale", f"guidance_scale must be a finite number, got {json.dumps(guidance)}")
    if seed is None:
        seed = secrets.randbelow(MAX_SEED + 1)
    image = init_image(body)
    loras = lora_choice(body, offered_loras)
    try:
        if image is not None:
            if max(image.width, image.height) > max_side:
                raise invalid("image", f"image is {image.width}x{image.height}: each side must be at most "
                                       f"{max_side} pixels (the server's --max-side)")
            height, width = image.sizes(height, width, multiple)
        params = resolve(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                         max_sequence_length=length, num_images_per_prompt=n, seed=seed)
        if image is not None:
            image.check(params)
    except InvalidInputError as e:
        raise invalid(param_of(str(e)), str(e)) from None
    return ImageRequest(params=params, prompt=prompt, model=body.get("model"), user=body.get("user"), image=image,
                        loras=loras)
