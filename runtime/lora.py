"""Where each linear of diffusers' FLUX transformer lives in an exported transformer graph, and the
initializers that make it compute ``W + Σ scaleᵢ·mᵢ·(upᵢ @ downᵢ)``.

Every attention mode keeps a linear's weight as one initializer: input 1 of a MatMul, stored [in, out], or
of a Gemm with ``transB=1``, stored [out, in]. Biases stay apart (a Gemm's C, an Add, one of fluxrt's ops),
so a LoRA changes weights only. ``--attention ort-kernels`` renames the module tree (a double block's
linears under ``.block``, the single blocks as one stack, ``single_transformer_blocks.0.blocks.I``) and
splits each single block's ``proj_out`` into its attention and MLP column blocks (``.proj.I.attn``,
``.proj.I.mlp``), its bias holding ``to_v``'s bias folded through the attention columns (``b + W_attn @ b_v``). The
export records ``b_v`` on the attention-columns product (``fluxrt.value_bias``), so a LoRA on such a ``proj_out`` is
merged into both column blocks and its bias becomes the stored one plus ``ΔW_attn @ b_v`` (added, from the graph's
own bias: nothing subtracted); under FP8 both column blocks are re-quantized and the bias is the attention product's
epilogue bias. Graphs exported before that record refuse it.

Under FP8 (a ``fluxrt quantize`` folder of an ort-kernels export), a linear is an ``Fp8Linear``: E4M3 weights
[out, in] with one float32 scale per output feature, or a band of rows of a fused product (the
``fluxrt.fused_products`` record says which). Its LoRA is merged into the dequantized E4M3 weights (the folder
holds no other copy) and re-quantized per output feature (scale = max |w| / 448); the calibrated activation scales
are kept, and the rows of a fused product that no LoRA targets keep their bytes.

A weight is read from the graph file on disk each time (never from a merged copy, and nothing is ever
subtracted): by its byte range in the external data file when it lives there, from the graph itself
otherwise (graphs under 2 GB). It is merged in float32, the LoRAs added in the order given, cast once to
the dtype the initializer is stored in and laid out as it is stored. ONNX Runtime takes merged weights of
external data as external initializers; inline ones in a serialized copy of the graph (``graph_with``).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from fluxrt import dtypes
from fluxrt.errors import EngineError, InvalidInputError
from fluxrt.lora import LoraFile
from fluxrt.node_origin import LINEAR_CLASSES, module_origin

WEIGHT_DTYPES = ("float32", "float16", "bfloat16")
# the ort-kernels export's module tree -> diffusers' (export/ort_kernels.py)
KERNEL_PATHS = (
    (re.compile(r"^transformer_blocks\.(\d+)\.block\.(.+)$"), r"transformer_blocks.\1.\2"),
    (re.compile(r"^single_transformer_blocks\.0\.blocks\.(\d+)\.(.+)$"), r"single_transformer_blocks.\1.\2"),
)
KERNEL_SPLIT = re.compile(r"^single_transformer_blocks\.0\.proj\.(\d+)\.(attn|mlp)$")
FOLDED_BIAS = ("in this --attention ort-kernels graph it is split into two products and its bias holds to_v's bias "
               "folded through its attention columns, which a new weight would change and the graph does not keep "
               "apart: merge the LoRA at export (fluxrt export --lora) or use an --attention ort or portable export")
OLD_SPLIT = (FOLDED_BIAS + "; graphs exported by this fluxrt record to_v's bias and take it: export again")
FP8_SPLIT = ("in this FP8 graph of an --attention ort-kernels export it is two FP8 products whose bias holds to_v's "
             "bias folded through the attention columns, which the graph does not record (quantized from an export "
             "made before fluxrt recorded it): export again and quantize, or merge the LoRA at export")
VALUE_BIAS_KEY = "fluxrt.value_bias"  # export/ort_kernels.py tag_value_biases

Loras = Sequence[tuple[LoraFile, float]]  # (file, scale), in load order
FP8_MAX = 448.0
FUSED_KEY = "fluxrt.fused_products"  # engines/fp8_ort.py's record of a fused Fp8Linear's members


@dataclass(frozen=True)
class Slot:
    """The initializer holding one linear's whole weight."""

    initializer: str
    dtype: str  # as stored
    dims: tuple[int, int]  # as stored
    transposed: bool  # stored [in, out]
    external: tuple[str, int] | None  # (data file beside the graph, byte offset) when in external data


@dataclass(frozen=True)
class Fp8Slot:
    """One linear inside an Fp8Linear: rows [start, start + count) of its E4M3 weight [N, K] and of its scales."""

    initializer: str
    scale: str
    dims: tuple[int, int]  # the whole stored weight, [N, K]
    rows: tuple[int, int]  # (start, count)
    external: tuple[str, int] | None
    scale_external: tuple[str, int] | None


@dataclass(frozen=True)
class SplitSlot:
    """An ort-kernels single block's ``proj_out``: its attention and MLP column blocks, and the bias the value bias
    was folded into (``value_bias`` None: nothing folded, the bias stays)."""

    attn: Slot
    mlp: Slot
    bias: Slot | None
    value_bias: np.ndarray | None  # float32 [attention width]

    @property
    def dtype(self) -> str:
        return self.attn.dtype


@dataclass(frozen=True)
class SplitFp8Slot:
    """SplitSlot's FP8 form: the two column blocks as Fp8Linears of their own, the folded bias their attention
    product's (cuBLASLt's epilogue bias)."""

    attn: Fp8Slot
    mlp: Fp8Slot
    bias: Slot | None
    value_bias: np.ndarray | None


def slot_initializers(slot) -> list[tuple[str, tuple[str, int] | None]]:
    """(initializer, external location) of everything a slot's merge writes."""
    if isinstance(slot, (SplitSlot, SplitFp8Slot)):
        return [pair for part in (slot.attn, slot.mlp, slot.bias) if part is not None for pair in slot_initializers(part)]
    if isinstance(slot, Fp8Slot):
        return [(slot.initializer, slot.external), (slot.scale, slot.scale_external)]
    return [(slot.initializer, slot.external)]


@dataclass(frozen=True)
class GraphLinears:
    path: Path
    shapes: dict[str, tuple[int, int]]  # module path -> (out, in), every linear found
    slots: dict[str, Slot | Fp8Slot]  # the linears a LoRA can change
    fixed: dict[str, str]  # module path -> why a LoRA cannot change it in this graph

    @property
    def inline(self) -> set[str]:
        """The initializers of ``slots`` stored in the graph file itself (not in external data)."""
        return {name for slot in self.slots.values() for name, external in slot_initializers(slot) if external is None}

    def check(self, loras: Loras) -> None:
        """Raise naming the file and the module unless every linear the LoRAs target can take them."""
        for lora, _ in loras:
            for module, delta in lora.deltas.items():
                if module in self.fixed:
                    raise InvalidInputError(f"LoRA file {lora.path}: it changes {module!r}, which the transformer "
                                            f"graph {self.path} cannot take: {self.fixed[module]}")
                if module not in self.slots:
                    raise InvalidInputError(f"LoRA file {lora.path}: it targets {module!r}, for which the transformer "
                                            f"graph {self.path} has no linear ({len(self.slots)} linears found)")
                if delta.shape != self.shapes[module]:
                    raise InvalidInputError(f"LoRA file {lora.path}: its update of {module!r} is [out, in] = "
                                            f"{list(delta.shape)}; the graph's linear is {list(self.shapes[module])}")

    def merged(self, loras: Loras, modules: Iterable[str] = ()) -> dict[str, np.ndarray]:
        """``{initializer: merged weight}`` for every linear the LoRAs target, and each of ``modules`` (a linear no
        LoRA targets gets the graph's own weight: what a refit that drops a LoRA writes back), in the stored dtype
        and layout."""
        self.check(loras)
        read = weight_reader(self.path)
        out = {}
        unknown = sorted(set(modules) - set(self.slots))
        if unknown:
            raise InvalidInputError(f"the transformer graph {self.path} has no linears {unknown[:4]}")
        targeted = sorted({m for lora, _ in loras for m in lora.deltas} | set(modules))
        fp8 = [m for m in targeted if isinstance(self.slots[m], Fp8Slot)]
        if fp8:
            out.update(merged_fp8(self.path, {m: self.slots[m] for m in fp8}, loras))
        for module in targeted:
            slot = self.slots[module]
            if isinstance(slot, Fp8Slot):
                continue
            if isinstance(slot, SplitSlot):
                out.update(merged_split(read, module, slot, loras))
                continue
            if isinstance(slot, SplitFp8Slot):
                out.update(merged_split_fp8(self.path, read, module, slot, loras))
                continue
            w = read(slot)  # float32 [out, in], pristine
            for lora, scale in loras:
                if module in lora.deltas:
                    w += lora.deltas[module].matrix(scale)
            w = dtypes.cast(w, slot.dtype)
            out[slot.initializer] = np.ascontiguousarray(w.T if slot.transposed else w)
        return out


def merged_split(read, module: str, slot: SplitSlot, loras: Loras) -> dict[str, np.ndarray]:
    """A split proj_out's two column blocks and (with a folded value bias) its bias, merged from the stored ones."""
    width = slot.attn.dims[0]  # stored [in, out]: the attention columns' in-features
    attn, mlp = read(slot.attn), read(slot.mlp)  # float32 [out, in] each
    for lora, scale in loras:
        if module in lora.deltas:
            delta = lora.deltas[module].matrix(scale)  # [out, attention + mlp]
            attn += delta[:, :width]
            mlp += delta[:, width:]
    out = moved_bias(read, module, slot, loras, width)
    for part, w in ((slot.attn, attn), (slot.mlp, mlp)):
        w = dtypes.cast(w, part.dtype)
        out[part.initializer] = np.ascontiguousarray(w.T if part.transposed else w)
    return out


def moved_bias(read, module: str, slot: SplitSlot | SplitFp8Slot, loras: Loras, width: int) -> dict[str, np.ndarray]:
    """``{bias initializer: the stored bias + Σ ΔW_attn @ b_v}`` for a split proj_out with a folded value bias
    (``width``: its attention columns), ``{}`` without one."""
    if slot.bias is None or slot.value_bias is None:
        return {}
    bias = read(slot.bias)
    for lora, scale in loras:
        if module in lora.deltas:
            bias += lora.deltas[module].matrix(scale)[:, :width] @ slot.value_bias
    return {slot.bias.initializer: np.ascontiguousarray(dtypes.cast(bias, slot.bias.dtype))}


def merged_split_fp8(path: Path, read, module: str, slot: SplitFp8Slot, loras: Loras) -> dict[str, np.ndarray]:
    """A split proj_out under FP8: each column block's E4M3 weight merged and re-quantized as any Fp8Linear's
    (merged_fp8, with the update's columns of that block), and the folded bias moved by dW_attn @ b_v."""
    from fluxrt.lora import Delta

    width = slot.attn.dims[1]  # [N, K]: the attention block's in-features
    parts = {f"{module}#attn": slot.attn, f"{module}#mlp": slot.mlp}
    sliced = []
    for lora, scale in loras:
        if module in lora.deltas:
            d = lora.deltas[module]
            deltas = {f"{module}#attn": Delta(d.down[:, :width], d.up, d.multiplier),
                      f"{module}#mlp": Delta(d.down[:, width:], d.up, d.multiplier)}
            sliced.append((LoraFile(lora.path, lora.layout, lora.sha256, deltas), scale))
    return {**merged_fp8(path, parts, sliced), **moved_bias(read, module, slot, loras, width)}


def diffusers_path(scope: str) -> str:
    """A node's module scope (under the export's ``TransformerGraph.model``) as diffusers' module path."""
    path = scope.removeprefix("model.")
    for pattern, replacement in KERNEL_PATHS:
        path = pattern.sub(replacement, path)
    return path


def graph_linears(path: str | Path) -> GraphLinears:
    """Every linear of the transformer graph at ``path``, found by the exporter's module-scope metadata."""
    import onnx

    path = Path(path)
    graph = onnx.load(str(path), load_external_data=False).graph
    tensors = {t.name: t for t in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    shapes, slots, fixed, split, split_nodes, fp8_split = {}, {}, {}, {}, {}, {}
    tagged = 0
    for node in graph.node:
        if node.op_type == "Fp8Linear" and node.domain == "fluxrt":
            tagged += fp8_linears(path, node, tensors, uses, shapes, slots, fixed, fp8_split)
            continue
        origin = module_origin(node) if node.op_type in ("MatMul", "Gemm") else None
        if origin is None:
            continue
        tagged += 1
        if origin[1] not in LINEAR_CLASSES:
            continue
        weight, tensor = node.input[1], tensors.get(node.input[1])
        if (m := KERNEL_SPLIT.match(origin[0].removeprefix("model."))) is not None:
            split.setdefault(f"single_transformer_blocks.{m[1]}.proj_out", {})[m[2]] = tensor
            split_nodes.setdefault(f"single_transformer_blocks.{m[1]}.proj_out", {})[m[2]] = node
            continue
        module = diffusers_path(origin[0])
        if module in shapes or module in fixed:
            raise EngineError(f"{path}: several MatMul/Gemm nodes come from the linear {module!r}; cannot map it")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        transposed = node.op_type == "MatMul" or not attrs.get("transB", 0)
        if tensor is None:
            fixed[module] = f"its weight {weight!r} is computed in the graph, not stored as an initializer"
            continue
        dims = tuple(tensor.dims)
        if len(dims) != 2:
            raise EngineError(f"{path}: the weight {weight!r} of {module!r} has shape {list(dims)}, not a matrix")
        shapes[module] = dims[::-1] if transposed else dims
        dtype = dtypes.from_onnx(tensor.data_type)
        if dtype not in WEIGHT_DTYPES:
            fixed[module] = f"its weight {weight!r} is stored as {dtype}, not one of {list(WEIGHT_DTYPES)}"
        elif uses[weight] > 1:
            fixed[module] = f"its weight {weight!r} also feeds {uses[weight] - 1} other node(s)"
        elif attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
            fixed[module] = f"its Gemm {node.name!r} transposes its input or scales the product"
        else:
            slots[module] = Slot(weight, dtype, dims, transposed, external_location(tensor))
    if not tagged:
        raise EngineError(f"{path}: no MatMul/Gemm node carries torch.onnx's module-scope metadata, so its linears "
                          f"cannot be found for LoRA; re-export the graph with fluxrt export")
    for module, parts in split.items():  # MatMul [in, out] each: attention columns, then the MLP's
        if sorted(parts) != ["attn", "mlp"] or None in parts.values():
            raise EngineError(f"{path}: {module}'s attention and MLP products are not two stored weights; cannot map it")
        shapes[module] = (parts["attn"].dims[1], parts["attn"].dims[0] + parts["mlp"].dims[0])
        slot = split_slot(graph, tensors, uses, split_nodes[module], parts)
        if isinstance(slot, str):
            fixed[module] = slot
        else:
            slots[module] = slot
    for module, parts in fp8_split.items():
        slot = split_fp8_slot(tensors, uses, parts)
        if not isinstance(slot, str):
            slots[module] = slot
            fixed.pop(module, None)
        elif slot != FP8_SPLIT:
            fixed[module] = slot
    return GraphLinears(path, shapes, slots, fixed)


def split_fp8_slot(tensors, uses, parts: dict) -> SplitFp8Slot | str:
    """The SplitFp8Slot of a split proj_out's two Fp8Linears ``parts`` ({"attn"|"mlp": node}), or why not."""
    if sorted(parts) != ["attn", "mlp"]:
        return "its attention and MLP products are not two Fp8Linears"
    made = {}
    for name, node in parts.items():
        weight, scale = tensors.get(node.input[2]), tensors.get(node.input[3])
        if (weight is None or scale is None or len(weight.dims) != 2 or uses[node.input[2]] > 1
                or uses[node.input[3]] > 1 or any(p.key == FUSED_KEY for p in node.metadata_props)):
            return f"its {name} columns' FP8 weight {node.input[2]!r} is not a stored initializer of its own"
        made[name] = Fp8Slot(node.input[2], node.input[3], tuple(int(d) for d in weight.dims),
                             (0, int(weight.dims[0])), external_location(weight), external_location(scale))
    value_bias = recorded_value_bias(parts["attn"])
    if isinstance(value_bias, str):
        return FP8_SPLIT
    if value_bias is None:
        return SplitFp8Slot(made["attn"], made["mlp"], None, None)
    bias = tensors.get(parts["attn"].input[4]) if len(parts["attn"].input) > 4 else None
    width, rows = made["attn"].dims[1], made["attn"].dims[0]
    if value_bias.shape != (width,) or bias is None or uses[bias.name] > 1 or list(bias.dims) != [rows]:
        return "the bias its value bias was folded into is not a stored vector of its attention product's own"
    return SplitFp8Slot(made["attn"], made["mlp"], vector_slot(bias), value_bias)


def recorded_value_bias(node) -> np.ndarray | None | str:
    """The value bias the export recorded on a split proj_out's attention product (VALUE_BIAS_KEY): float32, None
    when nothing was folded, or "absent" for a graph exported before the record."""
    meta = {p.key: p.value for p in node.metadata_props}
    if VALUE_BIAS_KEY not in meta:
        return "absent"
    if meta[VALUE_BIAS_KEY] == "none":
        return None
    import base64

    return np.frombuffer(base64.b64decode(meta[VALUE_BIAS_KEY]), dtype="<f4").astype(np.float32)


def vector_slot(tensor) -> Slot:
    return Slot(tensor.name, dtypes.from_onnx(tensor.data_type), tuple(tensor.dims), False, external_location(tensor))


def split_slot(graph, tensors, uses, nodes: dict, parts: dict) -> SplitSlot | str:
    """The SplitSlot of a split proj_out (its MatMuls ``nodes``, weights ``parts``), or why a LoRA cannot change it:
    the value bias must be recorded on the attention product, and the bias it was folded into must be the stored
    bias input of the one GatedResidual that sums the two products."""
    value_bias = recorded_value_bias(nodes["attn"])
    if isinstance(value_bias, str):
        return OLD_SPLIT
    for name, tensor in parts.items():
        if uses[tensor.name] > 1 or dtypes.from_onnx(tensor.data_type) not in WEIGHT_DTYPES or len(tensor.dims) != 2:
            return f"its {name} columns' weight {tensor.name!r} is shared, not a matrix or not float"
    part_slots = {name: Slot(t.name, dtypes.from_onnx(t.data_type), tuple(t.dims), True, external_location(t))
                  for name, t in parts.items()}
    if value_bias is None:
        return SplitSlot(part_slots["attn"], part_slots["mlp"], None, None)
    if value_bias.shape != (parts["attn"].dims[0],):
        return f"its recorded value bias has {value_bias.size} values for {parts['attn'].dims[0]} attention columns"
    product = nodes["attn"].output[0]
    users = [n for n in graph.node if product in n.input]
    if len(users) != 1 or users[0].op_type != "GatedResidual" or list(users[0].input).index(product) != 1:
        return "its attention product does not go straight into one GatedResidual, which holds the folded bias"
    bias = tensors.get(users[0].input[2]) if len(users[0].input) > 2 else None
    if bias is None or uses[bias.name] > 1 or len(bias.dims) != 1 or bias.dims[0] != parts["attn"].dims[1]:
        return "the bias its value bias was folded into is not a stored vector of its own"
    return SplitSlot(part_slots["attn"], part_slots["mlp"], vector_slot(bias), value_bias)


def fp8_linears(path: Path, node, tensors, uses, shapes, slots, fixed, fp8_split: dict) -> int:
    """The linears an Fp8Linear computes (one, or a fused product's members by their rows) into ``shapes`` and
    ``slots`` (or ``fixed``, with why; a split proj_out's column blocks into ``fp8_split``); returns how many were
    found."""
    meta = {p.key: p.value for p in node.metadata_props}
    if FUSED_KEY in meta:
        members = [(m["module"], tuple(m["columns"])) for m in json.loads(meta[FUSED_KEY])]
    else:
        origin = module_origin(node)
        if origin is None or origin[1] not in LINEAR_CLASSES:
            return 0
        members = [(origin[0], None)]
    weight, scale = tensors.get(node.input[2]), tensors.get(node.input[3])
    for scope, columns in members:
        if (m := KERNEL_SPLIT.match(scope.removeprefix("model."))) is not None:
            module = f"single_transformer_blocks.{m[1]}.proj_out"
            # its two column blocks, each an Fp8Linear of its own: the in-features add up
            out_f, in_f = shapes.get(module, (0, 0))
            shapes[module] = (weight.dims[0], in_f + weight.dims[1]) if weight is not None else (out_f, in_f)
            fixed[module] = FP8_SPLIT  # until both column blocks are found (graph_linears)
            fp8_split.setdefault(module, {})[m[2]] = node
            continue
        module = diffusers_path(scope)
        if module in shapes or module in fixed:
            raise EngineError(f"{path}: several Fp8Linear nodes compute the linear {module!r}; cannot map it")
        if weight is None or scale is None or len(weight.dims) != 2:
            fixed[module] = f"its FP8 weight {node.input[2]!r} or scale {node.input[3]!r} is not a stored initializer"
            shapes[module] = (0, 0)
            continue
        rows = columns if columns is not None else (0, int(weight.dims[0]))
        shapes[module] = (rows[1], int(weight.dims[1]))
        if uses[node.input[2]] > 1 or uses[node.input[3]] > 1:
            fixed[module] = f"its FP8 weight {node.input[2]!r} also feeds other nodes"
        else:
            slots[module] = Fp8Slot(node.input[2], node.input[3], tuple(int(d) for d in weight.dims), rows,
                                    external_location(weight), external_location(scale))
    return len(members)


def merged_fp8(path: Path, slots: Mapping[str, Fp8Slot], loras: Loras) -> dict[str, np.ndarray]:
    """``{initializer: array}``: the E4M3 weights and scales of every Fp8Linear the LoRAs change, merged and
    re-quantized (see the module doc). Weights as float8_e4m3fn, scales as float32."""
    by_weight: dict[str, list[tuple[str, Fp8Slot]]] = {}
    for module, slot in slots.items():
        by_weight.setdefault(slot.initializer, []).append((module, slot))
    out = {}
    for name, members in by_weight.items():
        first = members[0][1]
        n, k = first.dims
        w8 = stored_values(path, name, first.external, "float8_e4m3fn", n * k).reshape(n, k).copy()
        scales = stored_values(path, first.scale, first.scale_external, "float32", n).copy()
        for module, slot in members:
            r0, count = slot.rows
            w = w8[r0:r0 + count].astype(np.float32) * scales[r0:r0 + count, None]  # pristine, dequantized
            for lora, scale in loras:
                if module in lora.deltas:
                    w += lora.deltas[module].matrix(scale)
            amax = np.abs(w).max(axis=1)
            s = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1)).astype(np.float32)
            w8[r0:r0 + count] = np.clip(w / s[:, None], -FP8_MAX, FP8_MAX).astype(w8.dtype)
            scales[r0:r0 + count] = s
        out[name], out[first.scale] = w8, scales
    return out


def stored_values(path: Path, name: str, external: tuple[str, int] | None, dtype: str, count: int) -> np.ndarray:
    """An initializer's ``count`` elements as stored: by its byte range in external data, or from the graph."""
    if external is None:
        import onnx
        from onnx import numpy_helper

        tensor = next(t for t in onnx.load(str(path), load_external_data=False).graph.initializer if t.name == name)
        if dtype == "float8_e4m3fn":
            raw = np.frombuffer(tensor.raw_data, dtype=np.uint8)
            return raw.view(dtypes.numpy_dtype(dtype)).reshape(-1)
        return numpy_helper.to_array(tensor).reshape(-1).astype(dtypes.numpy_dtype(dtype))
    file, offset = external
    values = np.fromfile(path.parent / file, dtype=dtypes.numpy_dtype(dtype), count=count, offset=offset)
    if values.size != count:
        raise EngineError(f"{path.parent / file}: the initializer {name!r} needs {count} values at byte {offset}, the "
                          f"file holds {values.size} there (truncated?)")
    return values


def external_location(tensor) -> tuple[str, int] | None:
    import onnx

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in tensor.external_data}
    return info["location"], int(info.get("offset", 0))


def weight_reader(path: Path) -> Callable[[Slot], np.ndarray]:
    """A function giving a slot's stored weight as float32 [out, in]: external data by its byte range alone;
    inline tensors from the graph, parsed on first need, once."""
    inline: dict = {}

    def read(slot: Slot) -> np.ndarray:
        if slot.external is None:
            if not inline:
                import onnx

                inline.update((t.name, t) for t in onnx.load(str(path), load_external_data=False).graph.initializer)
            from onnx import numpy_helper

            stored = numpy_helper.to_array(inline[slot.initializer])
        else:
            name, offset = slot.external
            count = math.prod(slot.dims)
            stored = np.fromfile(path.parent / name, dtype=dtypes.numpy_dtype(slot.dtype), count=count, offset=offset)
            if stored.size != count:
                raise EngineError(f"{path.parent / name}: the weight {slot.initializer!r} needs {count} values at "
                                  f"byte {offset}, the file holds {stored.size} there (truncated?)")
        w = stored.reshape(slot.dims).astype(np.float32)
        return w.T if slot.transposed else w

    return read


def graph_with(path: Path, weights: Mapping[str, np.ndarray]) -> bytes:
    """The graph at ``path``, serialized, with its inline initializers named in ``weights`` replaced by them
    (external data references kept as they are)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name], tensor.name))
    return model.SerializeToString()
