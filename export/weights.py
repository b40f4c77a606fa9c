"""safetensors files -> torch modules: headers validated against the file, shard indexes, key
sets checked by name, weights memory-mapped and assigned into modules built on the meta device."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

import torch

from fluxrt.dtypes import PRECISION_DTYPE
from fluxrt.errors import CheckpointError
from fluxrt.files import read_json

TORCH_DTYPES = {p: getattr(torch, name) for p, name in PRECISION_DTYPE.items()}  # "fp16" -> torch.float16


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, validated against the file's size."""
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path} is not a safetensors file: {size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 * 2**20):
                raise CheckpointError(f"{path} is not a safetensors file: header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file: its header is a JSON {type(header).__name__}, "
                              f"expected an object of tensors")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        check_entry(path, key, entry)
        end = max(end, entry["data_offsets"][1])
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: its header needs {8 + n + end} bytes, the file has {size}")
    return header


FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1}  # the weights fluxrt converts
# float8 files as the community ships them: a ``<layer>.weight`` in float8 with, optionally, its scale beside it
# (ComfyUI's "scaled fp8": ``<layer>.scale_weight`` and a ``scaled_fp8`` marker; ModelOpt's and compressed-tensors':
# ``<layer>.weight_scale``), per tensor or per output channel: weight = float8 value * scale. Activation scales
# (``scale_input``, ``input_scale``) mean nothing once the weights are upcast and are dropped.
WEIGHT_SCALES = (".scale_weight", ".weight_scale")
DROPPED_FP8_KEYS = ("scaled_fp8",)
DROPPED_FP8_SUFFIXES = (".scale_input", ".input_scale")
INDEX_DTYPES = {"I64": 8, "I32": 4}  # position ids that older CLIP files carry


def check_entry(path: Path, key: str, entry) -> None:
    """One tensor of a safetensors header: a float dtype (integer ids for ``position_ids`` only), a shape of
    non-negative integers, and data offsets that span exactly its bytes."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(f"{path}: header entry {key!r} is {entry!r}, expected dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    sizes = dict(FLOAT_DTYPES, **(INDEX_DTYPES if key.endswith("position_ids") else {}))
    if dtype not in sizes:
        raise CheckpointError(f"{path}: tensor {key!r} is {dtype}; fluxrt takes float weights "
                              f"({', '.join(FLOAT_DTYPES)}), not integer ones")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {key!r} has shape {shape!r}, expected a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: tensor {key!r} has data_offsets {offsets!r}, expected [begin, end]")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * sizes[dtype]:
        raise CheckpointError(f"{path}: tensor {key!r} spans {offsets[1] - offsets[0]} bytes, its {dtype} shape "
                              f"{shape} needs {numel * sizes[dtype]}")


def weight_files(folder: Path, single_name: str) -> list[Path]:
    """The safetensors files of one component folder: a single file, or the shards its index lists."""
    single = folder / single_name
    index = folder / f"{single_name}.index.json"
    if index.is_file():
        data = read_json(index, f"shard index of {folder.name}", CheckpointError)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"shard index {index} has no 'weight_map' object")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(
                f"shard index {index} lists {len(shards)} shards but {len(missing)} are missing: {missing[:5]}"
            )
        return [folder / s for s in shards]
    if single.is_file():
        return [single]
    raise CheckpointError(f"{folder} holds no weights: expected {single_name} or {single_name}.index.json")


def weight_keys(keys) -> list[str]:
    """A file's tensor names less float8 scales and markers (consumed when the weights are upcast)."""
    return [k for k in keys if k != "__metadata__" and k.rsplit(".", 1)[-1] not in DROPPED_FP8_KEYS
            and not k.endswith(DROPPED_FP8_SUFFIXES + WEIGHT_SCALES)]


def read_state_dict(files: list[Path], dtype: torch.dtype | None, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of ``files`` (only the keys under ``prefix``, which is taken off), in ``dtype`` (None: as stored,
    float8 upcast to float32). float8 weights are upcast with their scales (see ``WEIGHT_SCALES``)."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for path in files:
        safetensors_header(path)
        with safe_open(str(path), framework="pt") as f:
            raw = {key[len(prefix):]: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)}
        for key, t in upcast_fp8(raw, str(path)).items():
            state[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return state


FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def upcast_fp8(raw: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """``raw`` with every float8 tensor in float32, a weight multiplied by its scale where one is stored beside it
    (a scalar, [1], [N] or [N, 1] for a weight of N output rows); the scales and markers consumed. A scale without
    a float8 weight, or of another shape, is refused by name."""
    if not any(t.dtype in FP8_TYPES for t in raw.values()):
        return raw
    out, used = {}, set()
    for key, t in raw.items():
        if key in DROPPED_FP8_KEYS or key.endswith(DROPPED_FP8_SUFFIXES) or key.endswith(WEIGHT_SCALES):
            continue
        if t.dtype not in FP8_TYPES:
            out[key] = t
            continue
        value = t.to(torch.float32)
        base = key.removesuffix(".weight")
        scales = [base + s for s in WEIGHT_SCALES if key.endswith(".weight") and base + s in raw]
        if len(scales) > 1:
            raise CheckpointError(f"{what}: the float8 weight {key!r} has two scales, {scales}; expected one")
        if scales:
            scale = raw[scales[0]].to(torch.float32)
            rows = value.shape[0] if value.dim() else 1
            if scale.numel() == 1:
                value = value * scale.reshape(())
            elif scale.numel() == rows and scale.dim() in (1, 2) and scale.shape[0] == rows:
                value = value * scale.reshape(rows, *([1] * (value.dim() - 1)))
            else:
                raise CheckpointError(f"{what}: scale {scales[0]!r} has shape {list(scale.shape)}; for the float8 "
                                      f"weight {key!r} of shape {list(value.shape)} expected one value or one per "
                                      f"output row ({rows})")
            used.add(scales[0])
        out[key] = value
    orphans = sorted(k for k in raw if k.endswith(WEIGHT_SCALES) and k not in used)
    if orphans:
        raise CheckpointError(f"{what}: weight scales without a float8 weight beside them: {orphans[:4]} (a scale "
                              f"belongs to '<layer>.weight' stored in float8)")
    return out


def check_keys(state: dict, expected: set[str], what: str, optional: set[str] = frozenset()) -> None:
    missing = sorted(expected - set(state) - optional)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:4]})")
        raise CheckpointError(f"{what}: wrong key set: {'; '.join(parts)}")


def match_prefix(state: dict, expected: set[str], prefix: str) -> dict:
    """transformers 4 wrote CLIP keys under ``text_model.``, transformers 5 modules have none (or the
    reverse): rename the file's keys to the module's convention."""
    has = any(k.startswith(prefix) for k in state)
    wants = any(k.startswith(prefix) for k in expected)
    if has and not wants:
        return {k.removeprefix(prefix): v for k, v in state.items()}
    if wants and not has:
        return {prefix + k: v for k, v in state.items()}
    return state


def module_on_meta(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.device("meta"):
        return factory()


def assign_weights(module: torch.nn.Module, state: dict, what: str, optional: set[str] = frozenset()) -> torch.nn.Module:
    expected = set(module.state_dict())
    check_keys(state, expected, what, optional)
    for key, tensor in module.state_dict().items():
        if key in state and tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{what}: tensor {key!r} has shape {tuple(state[key].shape)}, the config expects {tuple(tensor.shape)}"
            )
    module.load_state_dict(state, strict=False, assign=True)
    assert not any(p.is_meta for p in module.parameters()), f"{what}: parameters left on meta"
    return module.eval().requires_grad_(False)
