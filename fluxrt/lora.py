"""LoRA adapter files for the FLUX transformer, read into one form: per linear of diffusers' module tree
(``transformer_blocks.0.attn.to_q``), the low-rank update ``m * (up @ down)`` in float32.

Layouts (told apart by their keys):

- diffusers / peft (``FluxPipeline.save_lora_weights``): ``transformer.<module>.lora_A.weight`` [r, in] and
  ``.lora_B.weight`` [out, r]; ``m = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``) from the header's
  ``lora_adapter_metadata`` (``transformer.r``, ``transformer.lora_alpha``, ``transformer.rank_pattern``,
  ``transformer.alpha_pattern``, patterns matched as peft matches them), and ``m = 1`` when the header has none
  (what diffusers does then: alpha = rank).
- kohya sd-scripts: ``lora_unet_double_blocks_I_{img,txt}_{attn_qkv,attn_proj,mlp_0,mlp_2,mod_lin}`` and
  ``lora_unet_single_blocks_I_{linear1,linear2,modulation_lin}`` with ``.lora_down.weight``, ``.lora_up.weight``
  and an optional ``.alpha``; ``m = alpha / rank``, or 1 without ``.alpha``. BFL's fused projections are split as
  diffusers' converter splits them: a double block's qkv into row thirds, a single block's ``linear1`` into q, k,
  v and the MLP's input projection, all sharing the one ``down``.

A key that names no linear of the model, a shape that does not fit it, text-encoder keys (fluxrt applies LoRA to
the transformer only) and variants fluxrt does not compute (DoRA, LoRA biases) are refused, naming the key.

Stored as float32, float16 or bfloat16; applied in float32. The file is read here rather than through
safetensors' numpy loader, which cannot give bfloat16 tensors (numpy has no such dtype): the format is an
8-byte little-endian header length, a JSON header of dtype, shape and byte range per tensor, then the bytes.
Numpy only: the runtime imports this, and so does the exporter's permanent merge.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from fluxrt.errors import InvalidInputError

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": "bf16"}
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class Delta:
    """One linear's update: ``multiplier * (up @ down)``, up [out, r] and down [r, in] in float32."""

    down: np.ndarray
    up: np.ndarray
    multiplier: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    def matrix(self, scale: float = 1.0) -> np.ndarray:
        """The [out, in] float32 update at ``scale`` (diffusers' ``set_adapters`` weight)."""
        return (np.float32(scale * self.multiplier) * self.up) @ self.down


@dataclass(frozen=True)
class LoraFile:
    path: str
    layout: str  # "peft" or "kohya"
    sha256: str
    deltas: dict[str, Delta] = field(repr=False)


# ------------------------------------------------------------------------------------------ the model's linears

def transformer_linears(config: Mapping) -> dict[str, tuple[int, int]]:
    """Every linear of diffusers' ``FluxTransformer2DModel`` with ``config``: module path -> (out, in)."""
    d = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    mlp = int(d * float(config.get("mlp_ratio", 4.0)))
    patch = int(config.get("patch_size", 1))
    out_channels = int(config.get("out_channels") or config["in_channels"])
    linears = {
        "x_embedder": (d, int(config["in_channels"])),
        "context_embedder": (d, int(config["joint_attention_dim"])),
        "time_text_embed.timestep_embedder.linear_1": (d, 256),
        "time_text_embed.timestep_embedder.linear_2": (d, d),
        "time_text_embed.text_embedder.linear_1": (d, int(config["pooled_projection_dim"])),
        "time_text_embed.text_embedder.linear_2": (d, d),
        "norm_out.linear": (2 * d, d),
        "proj_out": (patch * patch * out_channels, d),
    }
    if config.get("guidance_embeds"):
        linears["time_text_embed.guidance_embedder.linear_1"] = (d, 256)
        linears["time_text_embed.guidance_embedder.linear_2"] = (d, d)
    for i in range(int(config["num_layers"])):
        b = f"transformer_blocks.{i}"
        for name in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out"):
            linears[f"{b}.{name}"] = (d, d)
        for ff in ("ff", "ff_context"):
            linears[f"{b}.{ff}.net.0.proj"] = (mlp, d)
            linears[f"{b}.{ff}.net.2"] = (d, mlp)
        linears[f"{b}.norm1.linear"] = (6 * d, d)
        linears[f"{b}.norm1_context.linear"] = (6 * d, d)
    for i in range(int(config["num_single_layers"])):
        b = f"single_transformer_blocks.{i}"
        for name in ("attn.to_q", "attn.to_k", "attn.to_v"):
            linears[f"{b}.{name}"] = (d, d)
        linears[f"{b}.proj_mlp"] = (mlp, d)
        linears[f"{b}.proj_out"] = (d, d + mlp)
        linears[f"{b}.norm.linear"] = (3 * d, d)
    return linears


# ---------------------------------------------------------------------------------------------- the file itself

def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """(tensors as float32 arrays, the header's ``__metadata__``, the file's sha256) of a safetensors file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InvalidInputError(f"LoRA file {path}: cannot be read ({e.strerror or e})") from None
    if len(raw) < 8:
        raise InvalidInputError(f"LoRA file {path}: {len(raw)} bytes, not a safetensors file")
    size = int.from_bytes(raw[:8], "little")
    if size > min(MAX_HEADER, len(raw) - 8):
        raise InvalidInputError(f"LoRA file {path}: header of {size} bytes in a file of {len(raw)}: not a "
                                f"safetensors file (or a truncated one)")
    try:
        header = json.loads(raw[8:8 + size])
    except ValueError as e:
        raise InvalidInputError(f"LoRA file {path}: its safetensors header is not JSON ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    data = memoryview(raw)[8 + size:]
    tensors = {}
    for key, entry in header.items():
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise InvalidInputError(f"LoRA file {path}: tensor {key!r} is stored as {entry.get('dtype')}; "
                                    f"expected one of {sorted(SAFETENSORS_DTYPES)}")
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        itemsize = 2 if dtype == "bf16" else np.dtype(dtype).itemsize
        if not 0 <= start <= end <= len(data) or end - start != itemsize * math.prod(shape):
            raise InvalidInputError(f"LoRA file {path}: tensor {key!r}'s byte range {start}..{end} does not hold "
                                    f"{entry['dtype']} {list(shape)} in {len(data)} bytes of data (truncated?)")
        if dtype == "bf16":
            bits = np.frombuffer(data[start:end], dtype="<u2").astype(np.uint32) << 16
            values = bits.view(np.float32)
        else:
            values = np.frombuffer(data[start:end], dtype=np.dtype(dtype).newbyteorder("<")).astype(np.float32)
        tensors[key] = values.reshape(shape)
    return tensors, metadata, hashlib.sha256(raw).hexdigest()


# --------------------------------------------------------------------------------------------------- layouts

PEFT = re.compile(r"^(?:transformer\.)?(?P<module>.+)\.lora_(?P<which>A|B)\.weight$")
KOHYA = re.compile(r"^lora_unet_(?P<module>[a-z0-9_]+)\.(?P<which>lora_down\.weight|lora_up\.weight|alpha)$")
KOHYA_DOUBLE = re.compile(r"^double_blocks_(?P<i>\d+)_(?P<stream>img|txt)_(?P<part>attn_qkv|attn_proj|mlp_0|mlp_2|mod_lin)$")
KOHYA_SINGLE = re.compile(r"^single_blocks_(?P<i>\d+)_(?P<part>linear1|linear2|modulation_lin)$")
KOHYA_DOUBLE_MODULES = {
    "img": {"attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "attn_proj": ("attn.to_out.0",),
            "mlp_0": ("ff.net.0.proj",), "mlp_2": ("ff.net.2",), "mod_lin": ("norm1.linear",)},
    "txt": {"attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "attn_proj": ("attn.to_add_out",),
            "mlp_0": ("ff_context.net.0.proj",), "mlp_2": ("ff_context.net.2",), "mod_lin": ("norm1_context.linear",)},
}
KOHYA_SINGLE_MODULES = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
                        "modulation_lin": ("norm.linear",)}


def pattern_value(patterns: Mapping[str, object], module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_lora(path: str | Path, config: Mapping) -> LoraFile:
    """The LoRA file at ``path`` for the transformer of ``config`` (diffusers' transformer config)."""
    path = Path(path)
    tensors, metadata, sha = read_safetensors(path)
    if not tensors:
        raise InvalidInputError(f"LoRA file {path}: holds no tensors")
    keys = sorted(tensors)
    text = [k for k in keys if k.split(".")[0].split("_")[0] in ("text", "t5", "clip") or k.startswith("lora_te")]
    if text:
        raise InvalidInputError(f"LoRA file {path}: {len(text)} tensors target a text encoder (first: {text[0]!r}); "
                                f"fluxrt applies LoRA to the transformer only: use a transformer-only LoRA")
    unsupported = [k for k in keys if re.search(r"(dora_scale|lora_magnitude_vector|lora_B\.bias|lora_up\.bias)", k)]
    if unsupported:
        raise InvalidInputError(f"LoRA file {path}: tensor {unsupported[0]!r} is a DoRA or LoRA-bias term, which "
                                f"fluxrt does not compute (plain LoRA only)")
    if all(KOHYA.match(k) for k in keys):
        deltas, layout = kohya_deltas(path, tensors, config), "kohya"
    elif all(PEFT.match(k) for k in keys):
        deltas, layout = peft_deltas(path, tensors, metadata, config), "peft"
    else:
        odd = next(k for k in keys if not (KOHYA.match(k) or PEFT.match(k)))
        raise InvalidInputError(f"LoRA file {path}: key {odd!r} is neither diffusers/peft "
                                f"('transformer.<module>.lora_A.weight') nor kohya ('lora_unet_<block>.lora_down.weight')")
    check_shapes(path, deltas, transformer_linears(config))
    return LoraFile(str(path), layout, sha, deltas)


def peft_metadata(path: Path, metadata: Mapping[str, str]) -> dict:
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise InvalidInputError(f"LoRA file {path}: its lora_adapter_metadata is not JSON ({e})") from None
    out = {k[len("transformer."):]: v for k, v in data.items() if k.startswith("transformer.")}
    if out.get("use_dora"):
        raise InvalidInputError(f"LoRA file {path}: its metadata says use_dora; fluxrt computes plain LoRA only")
    return out


def peft_deltas(path: Path, tensors: dict[str, np.ndarray], metadata: Mapping[str, str], config: Mapping) -> dict:
    meta = peft_metadata(path, metadata)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = PEFT.match(key)
        pairs.setdefault(m["module"], {})[m["which"]] = value
    deltas = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise InvalidInputError(f"LoRA file {path}: module {module!r} has no {missing}.weight")
        down, up = pair["A"], pair["B"]
        check_pair(path, module, down, up)
        rank = down.shape[0]
        if meta:
            r = int(pattern_value(meta.get("rank_pattern") or {}, module, meta.get("r", rank)))
            alpha = float(pattern_value(meta.get("alpha_pattern") or {}, module, meta.get("lora_alpha", r)))
            if r != rank:
                raise InvalidInputError(f"LoRA file {path}: {module}.lora_A.weight has rank {rank}, its metadata "
                                        f"says r = {r}")
            multiplier = alpha / math.sqrt(r) if meta.get("use_rslora") else alpha / r
        else:
            multiplier = 1.0
        deltas[module] = Delta(down, up, multiplier)
    return deltas


def kohya_deltas(path: Path, tensors: dict[str, np.ndarray], config: Mapping) -> dict:
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = KOHYA.match(key)
        groups.setdefault(m["module"], {})[m["which"].split(".")[0]] = value
    d = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    deltas = {}
    for name, group in sorted(groups.items()):
        if "lora_down" not in group or "lora_up" not in group:
            missing = "lora_up" if "lora_down" in group else "lora_down"
            raise InvalidInputError(f"LoRA file {path}: lora_unet_{name} has no {missing}.weight")
        down, up = group["lora_down"], group["lora_up"]
        check_pair(path, f"lora_unet_{name}", down, up)
        rank = down.shape[0]
        alpha = group.get("alpha")
        multiplier = float(alpha.reshape(-1)[0]) / rank if alpha is not None else 1.0
        if (m := KOHYA_DOUBLE.match(name)) is not None:
            block, modules = f"transformer_blocks.{m['i']}", KOHYA_DOUBLE_MODULES[m["stream"]][m["part"]]
        elif (m := KOHYA_SINGLE.match(name)) is not None:
            block, modules = f"single_transformer_blocks.{m['i']}", KOHYA_SINGLE_MODULES[m["part"]]
        else:
            raise InvalidInputError(f"LoRA file {path}: lora_unet_{name} names no linear fluxrt knows (expected "
                                    f"double_blocks_I_{{img,txt}}_{{attn_qkv,attn_proj,mlp_0,mlp_2,mod_lin}} or "
                                    f"single_blocks_I_{{linear1,linear2,modulation_lin}})")
        if len(modules) == 1:
            sizes = [up.shape[0]]
        elif len(modules) == 3:  # a fused qkv: equal row thirds
            if up.shape[0] % 3:
                raise InvalidInputError(f"LoRA file {path}: lora_unet_{name}.lora_up.weight has {up.shape[0]} rows, "
                                        f"not three equal parts of q, k and v")
            sizes = [up.shape[0] // 3] * 3
        else:  # a single block's linear1: q, k, v (D rows each), then the MLP's input projection
            sizes = [d, d, d, up.shape[0] - 3 * d]
            if sizes[-1] <= 0:
                raise InvalidInputError(f"LoRA file {path}: lora_unet_{name}.lora_up.weight has {up.shape[0]} rows; "
                                        f"q, k and v alone need {3 * d}")
        for module, part in zip(modules, np.split(up, np.cumsum(sizes)[:-1], axis=0)):
            deltas[f"{block}.{module}"] = Delta(down, np.ascontiguousarray(part), multiplier)
    return deltas


def check_pair(path: Path, name: str, down: np.ndarray, up: np.ndarray) -> None:
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise InvalidInputError(f"LoRA file {path}: {name}'s down {list(down.shape)} and up {list(up.shape)} are "
                                f"not [rank, in] and [out, rank] matrices of one rank")


def check_shapes(path: Path, deltas: Mapping[str, Delta], linears: Mapping[str, tuple[int, int]]) -> None:
    for module, delta in deltas.items():
        if module not in linears:
            raise InvalidInputError(f"LoRA file {path}: it targets {module!r}, which this transformer does not have "
                                    f"(a LoRA for another model, or for more blocks than this one has?)")
        if delta.shape != linears[module]:
            raise InvalidInputError(f"LoRA file {path}: its update of {module!r} is [out, in] = {list(delta.shape)}; "
                                    f"this transformer's linear is {list(linears[module])}")

