"""FP8 for fluxrt's ONNX Runtime kernels: an ``--attention ort-kernels`` transformer calibrated and
rewritten onto the op library's FP8 ops (runtime/ort_ops/fluxrt_ops.cu), so ONNX Runtime runs its
block linears on FP8 tensor cores (cuBLASLt) and, on the CPU, on the reference kernels.

1. Select: the same linears as the TensorRT recipe (``fp8.RULES``): the blocks' attention
   projections and MLPs, by the module path each MatMul carries; the AdaLN modulation, embedders,
   final projection and attention products keep the graph's precision.
2. Calibrate (max, as the TensorRT recipe): the graph with ``max |x|`` of every selected linear's
   input as extra outputs, run by ONNX Runtime (with the op library) on the feeds the sampling loop
   gave; the largest value over all feeds is that activation's ``amax``.  Weights: ``max |w|`` per
   output feature.  Scales are ``amax / 448`` (1 where amax is 0): E4M3's full range.
3. Rewrite (:func:`fp8_graph`): each selected ``MatMul(x, W [K, N])`` becomes
   ``Fp8Linear(x8, x_scale, W8 [N, K], w_scale [N], bias)``, its weights stored in E4M3 and the
   bias moved out of the op that consumed the product (NormRope, GatedResidual, BiasGelu) into
   cuBLASLt's epilogue (zeros where the linear has none).  ``x8`` comes from the kernel that makes
   ``x`` where fluxrt has one: ``AdaLayerNorm`` and ``BiasGelu`` become ``AdaLayerNormFp8`` and
   ``BiasGeluFp8`` when every consumer of their output is a quantized linear; anything else (the
   attention output) gets a ``QuantizeFp8``.  GELU stays in BiasGeluFp8 rather than cuBLASLt's
   epilogue: cuBLASLt writes no FP8 output with per-channel scales, and BiasGeluFp8 writes the MLP's
   FP8 input in the one pass over memory that a separate quantizer would take anyway.
4. FP8 attention (``attention=True``, ``fluxrt quantize --fp8-attention``): every
   ``MultiHeadAttention`` becomes ``Fp8Attention`` (cuDNN's FP8 attention on CUDA): q, k and v quantized by
   the ``NormRope`` that makes them (``NormRopeFp8``) or a ``QuantizeFp8``, each with its calibrated scale;
   the output written in E4M3 straight into the FP8 linears that read it (the double blocks' ``Split`` into
   text and image rows done by the op), at one scale: the largest amax of those linears' inputs.
Fast accumulation (``fast_accumulation=True``, ``fluxrt quantize --fp8-fast-accumulation``): every ``Fp8Linear``
   asks cuBLASLt for FP8 fast accumulation (the tensor cores' accumulator throughout, as torchao's FP8 inference
   does); the CPU reference accumulates in float32 either way.
5. Fused products (``fuse=True``, the default): the FP8 linears that read one quantized input (a single
   block's q, k, v and MLP projections; a double block stream's q, k and v) become one ``Fp8Linear`` over
   their weights stacked along N, each consumer reading its own columns of the product in place (the ops'
   ``column_start``/``column_count``). One wide matrix product fills the GPU where three or four narrow ones
   leave waves half empty; per-output-channel scales make the result the same, element for element. The fused
   node records its members (``fluxrt.fused_products``: node, module path and columns of each).
6. The same calibration as Q/DQ (:func:`qdq_graph`): QuantizeLinear/DequantizeLinear pairs on the
   activations and DequantizeLinear on the stored E4M3 weights (per output channel), the graph
   TensorRT's FP8 recipe builds and ONNX Runtime evaluates with its own operators: the reference
   the rewritten graph is tested against.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from fluxrt.components import MSFT_DOMAIN, ORT_OPS_DOMAIN
from fluxrt.errors import EngineError

E4M3_MAX = 448.0
FUSED_QUANTIZERS = {"AdaLayerNorm": "AdaLayerNormFp8", "BiasGelu": "BiasGeluFp8"}
# (consumer op, input index of the product) -> input index of the bias added to it
BIAS_SLOTS = {("NormRope", 0): 1, ("NormRope", 3): 4, ("GatedResidual", 1): 2, ("BiasGelu", 0): 1}
AMAX_PREFIX = "fluxrt_amax/"
# ops that read a column window of a wider input (fluxrt_ops.cu's column_start/column_count), and which inputs
WINDOWED_INPUTS = {"NormRope": (0, 3), "NormRopeFp8": (0, 3), "BiasGelu": (0,), "BiasGeluFp8": (0,), "QuantizeFp8": (0,)}
FUSED_KEY = "fluxrt.fused_products"


@dataclass(frozen=True)
class Linear:
    """A selected linear: its MatMul node, module path, input tensor and weight initializer ([K, N])."""

    node: str
    path: str
    input: str
    weight: str


def kernel_linears(model, selected: Mapping[str, str], what: str) -> list[Linear]:
    """The selected ``{node name: module path}`` as Linears: MatMuls whose weight is an initializer."""
    inits = {t.name for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    out = []
    for name, path in selected.items():
        node = nodes[name]
        if node.op_type != "MatMul" or node.input[1] not in inits:
            raise EngineError(f"{what}: linear {path} is a {node.op_type} without an initializer weight; the FP8 "
                              f"rewrite takes the MatMul(x, W) of an ort-kernels export")
        out.append(Linear(name, path, node.input[0], node.input[1]))
    return out


# ---------------------------------------------------------------- tensors

def e4m3(values: np.ndarray) -> np.ndarray:
    """float32 -> E4M3 as ONNX QuantizeLinear(saturate=1) and the op library round: nearest, ties to even,
    clipped to +-448."""
    import ml_dtypes

    return np.clip(values.astype(np.float32), -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)


def mapped_file(path: str) -> np.ndarray:
    """A whole external-data file as read-only bytes, memory-mapped (the page cache holds what was read); one
    map per file version (a file replaced under the same name is mapped anew)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise EngineError(f"external data file {path}: {e.strerror}") from None
    return _mapped(path, st.st_ino, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _mapped(path: str, inode: int, mtime_ns: int, size: int) -> np.ndarray:
    return np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)


STORED_DTYPES = {1: np.float32, 10: np.float16, 16: np.uint16}  # TensorProto FLOAT, FLOAT16, BFLOAT16 (its bits)


def stored_values(tensor, folder: str | Path | None = None) -> np.ndarray:
    """An initializer's elements as stored (bfloat16 as uint16 bits), read in place: from ``raw_data``, or from its
    external data file under ``folder`` through a memory map (nothing of the file is copied until used)."""
    from onnx import TensorProto, numpy_helper

    dims = tuple(tensor.dims)
    if tensor.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        if folder is None:
            raise EngineError(f"initializer {tensor.name!r} is stored in {info.get('location')!r}, but no folder was "
                              f"given to read it from")
        dtype = STORED_DTYPES.get(tensor.data_type)
        if dtype is None:
            raise EngineError(f"initializer {tensor.name!r}: element type {tensor.data_type} is not a float type the "
                              f"FP8 rewrite reads")
        path = Path(folder) / info["location"]
        offset = int(info.get("offset", 0))
        count = int(np.prod(dims, dtype=np.int64))
        data = mapped_file(str(path))
        end = offset + count * np.dtype(dtype).itemsize
        if end > data.size:
            raise EngineError(f"initializer {tensor.name!r}: {path} holds {data.size} bytes, the tensor ends at {end}")
        return data[offset:end].view(dtype).reshape(dims)
    if tensor.data_type == TensorProto.BFLOAT16:
        bits = np.frombuffer(tensor.raw_data, dtype=np.uint16) if tensor.raw_data else \
            np.asarray(tensor.int32_data, dtype=np.uint16)
        return bits.reshape(dims)
    return numpy_helper.to_array(tensor)


def to_float32(tensor, folder: str | Path | None = None) -> np.ndarray:
    """An initializer's values as float32 (bfloat16 read from its raw bits; external data from ``folder``)."""
    from onnx import TensorProto

    values = stored_values(tensor, folder)
    if tensor.data_type == TensorProto.BFLOAT16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def parallel_map(fn: Callable, items: Sequence, threads: int | None = None) -> list:
    """``[fn(x) for x in items]`` on a thread pool: NumPy's casts, clips and reductions release the GIL."""
    threads = threads or min(16, os.cpu_count() or 1)
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


def from_float32(values: np.ndarray, name: str, data_type: int):
    """A float32 array as an initializer of ``data_type`` (float, float16 or bfloat16, rounded to nearest even)."""
    from onnx import TensorProto, numpy_helper

    if data_type == TensorProto.BFLOAT16:
        import ml_dtypes

        raw = values.astype(np.float32).astype(ml_dtypes.bfloat16).tobytes()
        return TensorProto(name=name, data_type=data_type, dims=values.shape, raw_data=raw)
    return numpy_helper.from_array(values.astype({TensorProto.FLOAT: np.float32,
                                                  TensorProto.FLOAT16: np.float16}[data_type]), name)


def fp8_tensor(values, name: str):
    from onnx import TensorProto

    return TensorProto(name=name, data_type=TensorProto.FLOAT8E4M3FN, dims=values.shape, raw_data=values.tobytes())


def scale_of(amax) -> np.ndarray:
    """amax / 448, with 1 where amax is 0 (an all-zero tensor: any scale gives zeros)."""
    amax = np.asarray(amax, dtype=np.float32)
    return np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1)).astype(np.float32)


@dataclass(frozen=True)
class Scales:
    """One calibration: per activation tensor its amax, per linear its weight's per-output-feature amax."""

    activations: dict[str, float]
    weights: dict[str, np.ndarray]  # module path -> [N]


def weight_amax(model, linears: Sequence[Linear], folder: str | Path | None = None) -> dict[str, np.ndarray]:
    """Per linear, ``max |W|`` per output feature (W [K, N]); external weights are read from ``folder``."""
    inits = {t.name: t for t in model.graph.initializer}
    amax = parallel_map(lambda lin: np.abs(to_float32(inits[lin.weight], folder)).max(axis=0), linears)
    return {lin.path: a for lin, a in zip(linears, amax)}


# ---------------------------------------------------------------- calibration

def amax_graph(model, tensors: Iterable[str]):
    """``model`` with ``max |t|`` (float32 scalars) of every tensor in ``tensors`` as extra outputs,
    named ``AMAX_PREFIX + i`` in order."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(list(model.graph.node), model.graph.name, list(model.graph.input),
                              list(model.graph.output), list(model.graph.initializer),
                              value_info=list(model.graph.value_info))
    for i, t in enumerate(tensors):
        name = f"{AMAX_PREFIX}{i}"
        graph.node.extend([
            helper.make_node("Cast", [t], [f"{name}/f"], to=TensorProto.FLOAT),
            helper.make_node("Abs", [f"{name}/f"], [f"{name}/abs"]),
            helper.make_node("ReduceMax", [f"{name}/abs"], [name], keepdims=0),
        ])
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, []))
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def ort_value(array: np.ndarray, onnx_type: str):
    """A captured feed as an OrtValue; bfloat16 comes as its uint16 bits."""
    import onnxruntime as ort
    from onnx import TensorProto

    if onnx_type == "tensor(bfloat16)":
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(array).view(np.uint16),
                                                               TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def activation_amax(model, tensors: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]], backend: str,
                    folder: Path) -> dict[str, float]:
    """``{tensor: max |tensor| over every feed}``, the graph run by ONNX Runtime on ``backend`` with fluxrt's
    op library.  ``model``: loaded without its external data, which ONNX Runtime reads from ``folder``."""
    import onnxruntime as ort

    from fluxrt.runtime.ort_ops import check_library, library_path

    device = "cuda" if backend == "ort-cuda" else "cpu"
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(check_library(library_path(), device)))
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    providers = ["CPUExecutionProvider"] if device == "cpu" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(amax_graph(model, tensors).SerializeToString(), options, providers=providers)
    except Exception as e:  # onnxruntime's own untyped errors
        raise EngineError(f"FP8 calibration: ONNX Runtime could not load the measuring graph: {e}") from None
    types = {i.name: i.type for i in session.get_inputs()}
    names = [f"{AMAX_PREFIX}{i}" for i in range(len(tensors))]
    amax = np.zeros(len(tensors), dtype=np.float32)
    for feed in feeds:
        values = session.run_with_ort_values(names, {k: ort_value(v, types[k]) for k, v in feed.items()})
        amax = np.maximum(amax, np.array([v.numpy() for v in values], dtype=np.float32).reshape(-1))
    bad = [t for t, a in zip(tensors, amax) if not np.isfinite(a)]
    if bad:
        raise EngineError(f"FP8 calibration: the inputs of {len(bad)} linears reached inf/NaN on the calibration "
                          f"feeds (first: {bad[0]}); the source graph overflows at this precision")
    return dict(zip(tensors, amax.tolist()))


# ---------------------------------------------------------------- graph rewrites

class GraphIndex:
    """Producers and users of every tensor among ``nodes`` (a list the rewrite edits; the same objects)."""

    def __init__(self, graph, nodes: list):
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in nodes for o in n.output}
        self.users = defaultdict(list)  # tensor -> [(node, input index)]
        for n in nodes:
            for i, t in enumerate(n.input):
                if t:
                    self.users[t].append((n, i))


def position(nodes: list, node) -> int:
    return next(i for i, n in enumerate(nodes) if n is node)


def graph_dtype(index: GraphIndex, linears: Sequence[Linear]) -> int:
    types = {index.inits[lin.weight].data_type for lin in linears}
    if len(types) != 1:
        raise EngineError(f"the selected linears' weights have several element types {sorted(types)}; expected one")
    return types.pop()


def insert_before_first_user(nodes: list, new: list, tensor: str) -> None:
    """Insert the nodes ``new`` (in order) before the first node that reads ``tensor``."""
    at = next(i for i, n in enumerate(nodes) if tensor in n.input)
    nodes[at:at] = new


def attention_nodes(model) -> list:
    return [n for n in model.graph.node if n.op_type == "MultiHeadAttention" and n.domain == MSFT_DOMAIN]


def attention_inputs(model) -> list[str]:
    """q, k and v of every attention node: the tensors FP8 attention calibrates besides the linears' inputs."""
    return list(dict.fromkeys(t for n in attention_nodes(model) for t in n.input[:3]))


def fp8_graph(model, linears: Sequence[Linear], scales: Scales, folder: str | Path | None = None,
              attention: bool = False, fuse: bool = True, fast_accumulation: bool = False):
    """Rewrite ``model`` in place onto fluxrt's FP8 ops (see the module doc); return it.  Weights stored as
    external data are read from ``folder``; the initializers the rewrite keeps stay where they are stored.
    ``attention``: attention in FP8 too (``scales`` then holds the amax of every attention's q, k and v).
    ``fuse``: the linears sharing a quantized input as one matrix product (step 5).  ``fast_accumulation``: every
    ``Fp8Linear`` with ``fast_accumulation=1`` (cuBLASLt's FP8 fast accumulation on CUDA; see the op library)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = list(graph.node)
    index = GraphIndex(graph, nodes)
    dtype = graph_dtype(index, linears)
    by_node = {lin.node: lin for lin in linears}
    by_name = {n.name: n for n in nodes}
    new_inits = []

    def quantize_weight(lin: Linear) -> tuple[np.ndarray, np.ndarray]:
        w_scale = scale_of(scales.weights[lin.path])
        return e4m3(to_float32(index.inits[lin.weight], folder).T / w_scale[:, None]), w_scale  # [N, K]

    weights = parallel_map(quantize_weight, linears)  # the one pass over the weights, on every core

    # the linears first: they take their biases from the ops that consume their products
    quantized = {t: f"{t}.fp8" for t in dict.fromkeys(lin.input for lin in linears)}
    for lin, (w8, w_scale) in zip(linears, weights):
        node = by_name[lin.node]
        new_inits += [fp8_tensor(w8, f"{lin.path}.weight_fp8"),
                      numpy_helper.from_array(w_scale, f"{lin.path}.weight_scale")]
        bias = take_bias(index, node.output[0])
        if bias is None:
            bias = f"{lin.path}.zero_bias"
            new_inits.append(from_float32(np.zeros(w8.shape[0], np.float32), bias, dtype))
        fp8 = helper.make_node("Fp8Linear", [quantized[lin.input], f"{lin.input}.fp8_scale", f"{lin.path}.weight_fp8",
                                             f"{lin.path}.weight_scale", bias], list(node.output), name=node.name,
                               domain=ORT_OPS_DOMAIN)
        fp8.metadata_props.extend(node.metadata_props)
        nodes[position(nodes, node)] = fp8

    # attention, whose outputs are then FP8 linear inputs made in FP8
    made, amax = set(), dict(scales.activations)
    if attention:
        made, shared = fp8_attention(nodes, index, by_node, quantized, scales, new_inits)
        amax.update(shared)

    # then the activations, quantized once each, by their producer where it is one of fluxrt's kernels
    for t in quantized:
        scale_name = f"{t}.fp8_scale"
        new_inits.append(numpy_helper.from_array(scale_of(amax[t]).reshape(()), scale_name))
        if t in made:
            continue
        producer = index.producer.get(t)
        fusable = (producer is not None and producer.domain == ORT_OPS_DOMAIN and producer.op_type in FUSED_QUANTIZERS
                   and all(user.name in by_node and i == 0 for user, i in index.users[t]))
        if fusable:
            inputs = list(producer.input) + [""] * (2 - len(producer.input)) if producer.op_type == "BiasGelu" \
                else list(producer.input)
            fused = helper.make_node(FUSED_QUANTIZERS[producer.op_type], inputs + [scale_name], [quantized[t]],
                                     name=f"{producer.name}.fp8", domain=ORT_OPS_DOMAIN)
            fused.attribute.extend(producer.attribute)
            nodes[position(nodes, producer)] = fused
        else:
            insert_before_first_user(nodes, [helper.make_node("QuantizeFp8", [t, scale_name], [quantized[t]],
                                                              name=f"{t}.quantize", domain=ORT_OPS_DOMAIN)],
                                     quantized[t])

    if fuse:
        stored = {f"{lin.path}.weight_fp8": w8 for lin, (w8, _) in zip(linears, weights)}
        stored.update({f"{lin.path}.weight_scale": ws for lin, (_, ws) in zip(linears, weights)})
        paths = {lin.node: lin.path for lin in linears}
        new_inits += fuse_products(nodes, {**index.inits, **{t.name: t for t in new_inits}}, stored, paths, dtype,
                                   folder)
    if fast_accumulation:
        for n in nodes:
            if n.domain == ORT_OPS_DOMAIN and n.op_type == "Fp8Linear":
                n.attribute.append(helper.make_attribute("fast_accumulation", 1))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {t for n in nodes for t in n.input}
    graph.initializer.extend(t for t in new_inits if t.name in used)
    drop_unused_initializers(graph)
    return model


def fuse_products(nodes: list, inits: Mapping, stored: Mapping[str, np.ndarray], paths: Mapping[str, str], dtype: int,
                  folder: str | Path | None) -> list:
    """Step 5 of the module doc, on ``nodes`` in place: every group of Fp8Linears reading one quantized input
    whose products reach only column-window inputs becomes one Fp8Linear. ``stored``: the E4M3 weights and
    weight scales by initializer name (as arrays); ``paths``: module path by node name. Returns the new
    initializers."""
    from onnx import helper, numpy_helper

    users = defaultdict(list)
    for n in nodes:
        for i, t in enumerate(n.input):
            if t:
                users[t].append((n, i))
    where = {id(n): i for i, n in enumerate(nodes)}

    def windowable(lin) -> bool:
        us = users[lin.output[0]]
        return bool(us) and all(u.domain == ORT_OPS_DOMAIN and i in WINDOWED_INPUTS.get(u.op_type, ())
                                and not any(a.name in ("column_start", "column_count") for a in u.attribute)
                                and list(u.input).count(lin.output[0]) == 1 for u, i in us)

    groups = defaultdict(list)
    for n in nodes:
        if n.domain == ORT_OPS_DOMAIN and n.op_type == "Fp8Linear" and n.name in paths and windowable(n):
            groups[(n.input[0], n.input[1])].append(n)
    producer = {o: n for n in nodes for o in n.output}

    def columns(groups) -> dict[str, tuple[int, int]]:
        """(start, width) of every fusable product in its group, members ordered by their first consumer."""
        out = {}
        for members in groups.values():
            if len(members) < 2:
                continue
            members.sort(key=lambda n: (min(where[id(u)] for u, _ in users[n.output[0]]), where[id(n)]))
            start = 0
            for n in members:
                width = int(stored[n.input[2]].shape[0])
                out[n.output[0]] = (start, width)
                start += width
        return out

    while True:  # a consumer reading two products (NormRope's x0, x1) needs the same window in both
        cols = columns(groups)
        bad = set()
        for n in nodes:
            ins = [n.input[i] for i in WINDOWED_INPUTS.get(n.op_type, ()) if i < len(n.input) and n.input[i]]
            if n.domain == ORT_OPS_DOMAIN and len(ins) > 1 and any(t in cols for t in ins) and \
                    len({cols.get(t) for t in ins}) != 1:
                bad.update(producer[t].name for t in ins if t in producer)
        if not bad:
            break
        for key in list(groups):
            groups[key] = [n for n in groups[key] if n.name not in bad]

    new_inits, windowed = [], set()  # windowed: consumers given their window (a NormRope reads two products)
    for (x8, x_scale), members in groups.items():
        if len(members) < 2:
            continue
        name = f"{members[0].name}.fused{len(members)}"
        w8 = np.concatenate([stored[n.input[2]] for n in members])
        w_scale = np.concatenate([stored[n.input[3]] for n in members])
        bias = np.concatenate([to_float32(inits[n.input[4]], folder) for n in members])
        new_inits += [fp8_tensor(w8, f"{name}.weight_fp8"), numpy_helper.from_array(w_scale.astype(np.float32), f"{name}.weight_scale"),
                      from_float32(bias, f"{name}.bias", dtype)]
        out = f"{name}.product"
        fused = helper.make_node("Fp8Linear", [x8, x_scale, f"{name}.weight_fp8", f"{name}.weight_scale",
                                               f"{name}.bias"], [out], name=name, domain=ORT_OPS_DOMAIN)
        record = [{"node": n.name, "module": paths[n.name], "columns": list(cols[n.output[0]])} for n in members]
        fused.metadata_props.add(key=FUSED_KEY, value=json.dumps(record))
        for n in members:
            start, width = cols[n.output[0]]
            for u, i in users[n.output[0]]:
                u.input[i] = out
                if id(u) not in windowed:
                    windowed.add(id(u))
                    u.attribute.extend([helper.make_attribute("column_start", start),
                                        helper.make_attribute("column_count", width)])
        # the fused product takes the first member's place (after the shared input, before every consumer)
        first_at = min(where[id(n)] for n in members)
        gone = {id(n) for n in members}
        nodes[:] = [fused if i == first_at else n for i, n in enumerate(nodes) if i == first_at or id(n) not in gone]
        where = {id(n): i for i, n in enumerate(nodes)}
    return new_inits


def fp8_attention(nodes: list, index: GraphIndex, by_node: Mapping, quantized: Mapping[str, str], scales: Scales,
                  new_inits: list) -> tuple[set[str], dict[str, float]]:
    """Every MultiHeadAttention in ``nodes`` replaced by Fp8Attention (see the module doc, step 4). Returns the
    linear inputs it now makes in FP8 and the amax each of them takes (the largest among one attention's)."""
    from onnx import helper, numpy_helper

    made, shared = set(), {}
    for mha in [n for n in nodes if n.op_type == "MultiHeadAttention" and n.domain == MSFT_DOMAIN]:
        what = f"FP8 attention at {mha.name}"
        if len(mha.input) > 3 and any(mha.input[3:]) or len(mha.output) > 1 and any(mha.output[1:]):
            raise EngineError(f"{what}: takes q, k, v and gives one output; this node has inputs {list(mha.input)} "
                              f"and outputs {list(mha.output)}")
        split, outs = attention_outputs(index, mha, by_node, what)
        top = max(scales.activations[t] for t in outs)
        shared.update({t: top for t in outs})
        made.update(outs)
        inputs = []
        for t in mha.input[:3]:
            if t in quantized:
                raise EngineError(f"{what}: its input {t} is also a quantized linear's input")
            scale = f"{t}.fp8_scale"
            new_inits.append(numpy_helper.from_array(scale_of(scales.activations[t]).reshape(()), scale))
            inputs.append((t, scale))
        attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
        node = helper.make_node(
            "Fp8Attention", [f"{t}.fp8" for t, _ in inputs] + [s for _, s in inputs] +
            [f"{outs[0]}.fp8_scale"] + ([split.input[1]] if split is not None else []),
            [quantized[t] for t in outs], name=f"{mha.name}.fp8", domain=ORT_OPS_DOMAIN,
            num_heads=attrs["num_heads"], **({"scale": float(attrs["scale"])} if attrs.get("scale") else {}))
        node.metadata_props.extend(mha.metadata_props)
        nodes[position(nodes, mha)] = node
        if split is not None:
            del nodes[position(nodes, split)]
        for t, scale in inputs:
            producer = index.producer.get(t)
            if (producer is not None and producer.domain == ORT_OPS_DOMAIN and producer.op_type == "NormRope"
                    and len(index.users[t]) == 1):
                fused = helper.make_node("NormRopeFp8", list(producer.input) + [""] * (8 - len(producer.input)) + [scale],
                                         [f"{t}.fp8"], name=f"{producer.name}.fp8", domain=ORT_OPS_DOMAIN)
                fused.attribute.extend(producer.attribute)
                nodes[position(nodes, producer)] = fused
            else:
                nodes.insert(position(nodes, node), helper.make_node("QuantizeFp8", [t, scale], [f"{t}.fp8"],
                                                                     name=f"{t}.quantize", domain=ORT_OPS_DOMAIN))
    if not made:
        raise EngineError("FP8 attention: the graph has no com.microsoft.MultiHeadAttention (export it with "
                          "--attention ort-kernels)")
    return made, shared


def attention_outputs(index: GraphIndex, mha, by_node: Mapping, what: str):
    """(the Split that cuts ``mha``'s output along the sequence, or None; the FP8 linear inputs it gives): the
    output must reach FP8 linears only, directly or through one such Split."""
    def linear_input(t: str) -> bool:
        return bool(index.users[t]) and all(u.name in by_node and i == 0 for u, i in index.users[t])

    out = mha.output[0]
    users = index.users[out]
    if linear_input(out):
        return None, [out]
    if len(users) == 1 and users[0][0].op_type == "Split" and users[0][0].domain in ("", "ai.onnx"):
        split = users[0][0]
        axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
        if axis in (1, -2) and len(split.output) == 2 and len(split.input) == 2 and all(map(linear_input, split.output)):
            return split, list(split.output)
    raise EngineError(f"{what}: its output must feed FP8 linears only (directly or through one Split along the "
                      f"sequence); it feeds {[(u.op_type, u.name) for u, _ in users]}")


def take_bias(index: GraphIndex, product: str) -> str | None:
    """The bias the op consuming ``product`` adds to it, removed from that op (the linear adds it now)."""
    users = index.users[product]
    if len(users) != 1:
        return None
    user, i = users[0]
    slot = BIAS_SLOTS.get((user.op_type, i)) if user.domain == ORT_OPS_DOMAIN else None
    if slot is None or slot >= len(user.input) or not user.input[slot] or user.input[slot] not in index.inits:
        return None
    bias = user.input[slot]
    user.input[slot] = ""
    return bias


def drop_unused_initializers(graph) -> None:
    used = {t for n in graph.node for t in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def qdq_graph(model, linears: Sequence[Linear], scales: Scales):
    """The same calibration as QuantizeLinear/DequantizeLinear around each selected MatMul (E4M3 weights
    stored, dequantized per output channel): the TensorRT recipe's graph, evaluated by ONNX Runtime's own
    operators.  Rewrites ``model`` in place; returns it."""
    from onnx import helper

    graph = model.graph
    nodes = list(graph.node)
    index = GraphIndex(graph, nodes)
    dtype = graph_dtype(index, linears)
    zero = fp8_tensor(e4m3(np.zeros((), np.float32)), "fp8_zero_point")
    new_inits, dequantized = [zero], {}
    for t in dict.fromkeys(lin.input for lin in linears):
        s = f"{t}.qdq_scale"
        new_inits.append(from_float32(scale_of(scales.activations[t]).reshape(()), s, dtype))
        dequantized[t] = f"{t}.dq"
        insert_before_first_user(nodes, [helper.make_node("QuantizeLinear", [t, s, zero.name], [f"{t}.q"]),
                                         helper.make_node("DequantizeLinear", [f"{t}.q", s, zero.name],
                                                          [dequantized[t]])], t)
    for lin in linears:
        node = next(n for n in nodes if n.name == lin.node)
        w = to_float32(index.inits[lin.weight])  # [K, N]
        w_scale = scale_of(scales.weights[lin.path])
        new_inits += [fp8_tensor(e4m3(w / w_scale[None, :]), f"{lin.path}.weight_fp8"),
                      from_float32(w_scale, f"{lin.path}.weight_scale", dtype)]
        dq = helper.make_node("DequantizeLinear", [f"{lin.path}.weight_fp8", f"{lin.path}.weight_scale"],
                              [f"{lin.path}.weight_dq"], axis=1)
        nodes.insert(position(nodes, node), dq)
        node.input[0], node.input[1] = dequantized[lin.input], f"{lin.path}.weight_dq"
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    drop_unused_initializers(graph)
    return model


def count_fp8_linears(model) -> int:
    """Fp8Linear nodes: matrix products (a fused one computes several linears)."""
    return sum(1 for n in model.graph.node if n.domain == ORT_OPS_DOMAIN and n.op_type == "Fp8Linear")


def fused_products(model) -> list[list[str]]:
    """The module paths each fused Fp8Linear computes, in column order."""
    return [[m["module"] for m in json.loads(p.value)] for n in model.graph.node if n.op_type == "Fp8Linear"
            for p in n.metadata_props if p.key == FUSED_KEY]



__all__ = ["Linear", "Scales", "activation_amax", "attention_inputs", "fp8_graph", "kernel_linears", "qdq_graph",
           "weight_amax"]
