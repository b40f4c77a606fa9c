"""Memory a generation call needs, estimated before any stage runs, and refused when it cannot fit.

The estimate counts the largest activations each stage holds at once at the call's batch and size,
from the folder's model configuration (not the weights, which are already loaded):

- transformer: the joined sequence of L = image + text tokens at width D = heads x head size, in the
  graph's precision: the residual streams, q/k/v and the attention output, the MLP's 4D hidden
  (16 x B x L x D values in all); and where attention is not fused (``--attention portable``) the
  score and softmax matrices, 2 x B x heads x L^2;
- VAE decoder (float32): at each level of the decoder the widest tensor, channels x height x width
  (the first level at the latent size, each next one upsampled 2x), four of them at once (a
  convolution's input, output and workspace);
- VAE encoder (float32, image-to-image only, over the K images given): the same count over the encoder's
  levels, the first at the image size, each next one downsampled 2x;
- host: the decoded images, float32 and 8-bit, B x 3 x H x W (and the K given images, float32, twice:
  as given and as the encoder's feed).

It is an estimate from below: the backends add their own workspaces.  A stage is refused when its
estimate exceeds the memory available where it runs (the host's ``MemAvailable``; the GPU's free
memory) with both numbers in the message.
"""

from __future__ import annotations

import os

from fluxrt.errors import InvalidInputError

GIB = 2**30
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def host_available() -> int | None:
    """Bytes the host can still give (Linux ``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_available() -> int | None:
    """Free bytes on the current CUDA device; None without cupy or a device."""
    try:
        import cupy

        return int(cupy.cuda.runtime.memGetInfo()[0])
    except Exception:  # no cupy, no driver: nothing to compare against
        return None


def available(device: str) -> int | None:
    return device_available() if device == "cuda" else host_available()


def transformer_bytes(config: dict, precision: str, attention: str, batch: int, tokens: int) -> int:
    heads = int(config.get("num_attention_heads", 24))
    width = heads * int(config.get("attention_head_dim", 128))
    size = BYTES.get(precision, 2)
    total = 16 * batch * tokens * width * size
    if attention == "portable":
        total += 2 * batch * heads * tokens * tokens * size
    return total


def vae_decoder_bytes(config: dict, batch: int, latent_h: int, latent_w: int) -> int:
    channels = list(reversed(config.get("block_out_channels") or (128, 256, 512, 512)))
    widest, h, w, previous = 0, latent_h, latent_w, channels[0]
    for i, c in enumerate(channels):
        widest = max(widest, max(previous, c) * h * w)
        previous = c
        if i < len(channels) - 1:
            h, w = 2 * h, 2 * w
    return 4 * 4 * batch * widest


def vae_encoder_bytes(config: dict, batch: int, height: int, width: int) -> int:
    channels = list(config.get("block_out_channels") or (128, 256, 512, 512))
    widest, h, w, previous = 0, height, width, channels[0]
    for i, c in enumerate(channels):
        widest = max(widest, max(previous, c) * h * w)
        previous = c
        if i < len(channels) - 1:
            h, w = h // 2, w // 2
    return 4 * 4 * batch * widest


def estimate(folder, p, encoder_images: int = 0) -> dict[str, int]:
    """``{stage: bytes}`` for the call ``p`` (a GenerationParams) on ``folder``'s model; ``encoder_images``: the
    images an image-to-image call encodes (0: text-to-image, no encoder stage)."""
    scale = folder.dims.vae_scale_factor
    image_tokens = (p.height // (2 * scale)) * (p.width // (2 * scale))
    manifest = getattr(folder, "manifest", None) or {}
    record = (manifest.get("components") or {}).get("transformer") or {}
    precision = folder.graph_precision("transformer") if folder.kind == "export" else folder.precision
    need = {
        "transformer": transformer_bytes(manifest.get("transformer_config") or {}, precision,
                                         record.get("attention", "portable"), p.batch,
                                         image_tokens + p.max_sequence_length),
        "vae_decoder": vae_decoder_bytes(folder.vae_config(), p.batch, p.height // scale, p.width // scale),
        "host": (5 * p.batch + 8 * encoder_images) * 3 * p.height * p.width,
    }
    if encoder_images:
        need["vae_encoder"] = vae_encoder_bytes(folder.vae_config(), encoder_images, p.height, p.width)
    return need


def check(folder, p, devices: dict[str, str], encoder_images: int = 0) -> dict[str, int]:
    """Refuse the call when a stage's estimate exceeds what is available where it runs; return the estimate.
    ``devices``: stage -> "cpu" or "cuda"; ``encoder_images``: see :func:`estimate`."""
    need = estimate(folder, p, encoder_images)
    for stage, size in need.items():
        device = devices.get(stage, "cpu")
        have = available(device)
        if have is not None and size > have:
            where = "GPU" if device == "cuda" else "host"
            raise InvalidInputError(
                f"{p.batch} image(s) at {p.width}x{p.height} with {p.max_sequence_length} text tokens need an estimated "
                f"{size / GIB:.1f} GiB of {where} memory for the {stage} stage, and {have / GIB:.1f} GiB is available: "
                f"lower the image size (--height/--width), the batch (--num-images, prompts) or the text length")
    return need
