"""Images as PNG files that carry the settings that made them (``fluxrt:KEY`` text chunks, JSON values), the
same for ``fluxrt generate`` and ``fluxrt serve``."""

from __future__ import annotations

import io
import json

from fluxrt.runtime.params import GenerationParams


def generation_settings(pipe, p: GenerationParams, prompt: str, model: str) -> dict:
    """What a PNG records of the call that made it: its parameters (seed included), the prompt, the model folder,
    variant, precision, each stage's backend and the LoRAs loaded."""
    settings = dict(p.to_json(), prompt=prompt, model=model, variant=pipe.variant, precision=pipe.folder.precision,
                    backends={k: r.backend for k, r in pipe.runners.items()},
                    loras=[{"path": lora.path, "sha256": lora.sha256, "scale": scale}
                           for lora, scale in pipe.loras.values()])
    settings.pop("prompts", None)
    return settings


def png_info(settings: dict, index: int):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in dict(settings, index=index).items():
        info.add_text(f"fluxrt:{key}", value if isinstance(value, str) else json.dumps(value))
    return info


def png_bytes(image, settings: dict, index: int, compress_level: int = 6) -> bytes:
    """One PIL image as PNG file bytes with ``settings`` and its ``index`` among the call's images; zlib's
    ``compress_level`` 0-9 (6, PIL's default, is what ``fluxrt generate`` writes; the pixels are the same at
    every level)."""
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=png_info(settings, index), compress_level=compress_level)
    return out.getvalue()
