"""The body of ``POST /v1/images/generations``: read, checked field by field, and turned into the pipeline's
parameters; every refusal an :class:`ApiError` in OpenAI's error shape naming the field.

OpenAI's image API fields: ``prompt`` (required), ``n``, ``size`` ("WxH", width first), ``response_format``
(``b64_json`` only: the server keeps no files to link to), ``model`` and ``user`` (accepted, recorded, not
used).  fluxrt's own: ``seed`` (0..2**64-1; drawn and reported when absent), ``num_inference_steps``,
``guidance_scale``, ``max_sequence_length`` (the variant's defaults when absent).  Any other field is refused.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass

from fluxrt.errors import InvalidInputError
from fluxrt.runtime.params import MAX_SEED, GenerationParams

MAX_BODY_BYTES = 1 << 20  # 1 MiB
FIELDS = ("prompt", "n", "size", "response_format", "model", "user", "seed", "num_inference_steps",
          "guidance_scale", "max_sequence_length")
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

    @property
    def n(self) -> int:
        return self.params.num_images_per_prompt

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call."""
        p = self.params
        return p.height, p.width, p.num_inference_steps, p.guidance_scale, p.max_sequence_length


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
                          ("num_images_per_prompt", "n"), ("batch", "n"), ("seed", "seed"), ("prompt", "prompt")):
        if message.startswith(prefix):
            return param
    if " image(s) at " in message:  # the memory estimate: the size and n together
        return "size"
    return None


def image_request(body: dict, resolve, max_n: int, max_side: int) -> ImageRequest:
    """Check ``body`` (see :func:`parse_body`) and make the pipeline parameters with ``resolve`` (the pipeline's
    ``params``: defaults, model and envelope checks), which raises InvalidInputError naming the argument."""
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
    try:
        params = resolve(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                         max_sequence_length=length, num_images_per_prompt=n, seed=seed)
    except InvalidInputError as e:
        raise invalid(param_of(str(e)), str(e)) from None
    return ImageRequest(params=params, prompt=prompt, model=body.get("model"), user=body.get("user"))
