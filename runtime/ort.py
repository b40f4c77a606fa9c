"""The ONNX Runtime backend (``ort-cpu``, ``ort-cuda``): one graph behind the runner interface.

On ``ort-cuda`` inputs and outputs are CuPy arrays bound to device memory through I/O binding, so
the loop never copies through the host; ``cuda_graph=True`` replays the run from a CUDA graph
captured per input shape.  A graph exported with ``--attention ort-kernels`` gets fluxrt's op
library (runtime/ort_ops/) registered on its session.  LoRA weights (``set_loras``) are merged from the
graph file's own weights (runtime/lora.py) and given to a new session in place of the graph's, before ONNX
Runtime optimizes it; the graph on disk is never changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fluxrt.components import ComponentSpec
from fluxrt import dtypes
from fluxrt.dtypes import BY_ORT, DTYPES, Array
from fluxrt.errors import EngineError, FluxRTError, InvalidInputError
from fluxrt.lora import LoraFile
from fluxrt.runner import Runner, backend_error

# ONNX Runtime graph transformers skipped on CUDA by default. MatMulAddFusion turns MatMul + bias Add
# into Gemm, whose CUDA kernel first broadcasts the bias into the output with a slow kernel and then
# accumulates into it: on an H100 (FLUX transformer, 1+2 full-width blocks, fp16) 25 such broadcasts
# took 1.25 ms of a 9.4 ms step; the plain per-channel Add kernels cost 0.37 ms (docs/benchmarks).
ORT_CUDA_DISABLED_OPTIMIZERS = ("MatMulAddFusion",)
ORT_BACKENDS = ("ort-cpu", "ort-cuda")
MAX_CUDA_GRAPHS = 8  # captured shapes per runner; each keeps its own input and output buffers


class OrtRunner(Runner):
    """ONNX Runtime.  ``cuda_graph=True`` captures the run in a CUDA graph per input shape (up to
    ``max_cuda_graphs``): each owns fixed input/output buffers, and later calls of that shape replay it."""

    def __init__(self, spec: ComponentSpec, precision: str, onnx_path: str | Path, backend: str = "ort-cpu",
                 session_options: Any = None, cuda_graph: bool = False,
                 disabled_optimizers: tuple[str, ...] | None = None, max_cuda_graphs: int = MAX_CUDA_GRAPHS,
                 custom_ops: str | Path | None = None):
        """``custom_ops``: fluxrt's ONNX Runtime op library (runtime/ort_ops/), registered on the
        session, for graphs exported with ``--attention ort-kernels``."""
        super().__init__(spec, precision)
        if backend not in ORT_BACKENDS:
            raise ValueError(f"OrtRunner backend {backend!r} is not one of {list(ORT_BACKENDS)}")
        if cuda_graph and backend != "ort-cuda":
            raise ValueError("cuda_graph needs backend 'ort-cuda'")
        if isinstance(max_cuda_graphs, bool) or not isinstance(max_cuda_graphs, int) or max_cuda_graphs < 1:
            raise InvalidInputError(f"max_cuda_graphs must be a positive integer, got {max_cuda_graphs!r}")
        self.backend = backend
        self.device = "cuda" if backend == "ort-cuda" else "cpu"
        self.onnx_path = Path(onnx_path)
        self.session_options = session_options
        self.cuda_graph = cuda_graph
        self.max_cuda_graphs = max_cuda_graphs
        if disabled_optimizers is None:  # ONNX Runtime graph transformers to skip, by name
            disabled_optimizers = ORT_CUDA_DISABLED_OPTIMIZERS if backend == "ort-cuda" else ()
        self.disabled_optimizers = tuple(disabled_optimizers)
        self.custom_ops = Path(custom_ops) if custom_ops is not None else None
        self.session = None
        self._graph_io = {}  # input shapes -> (input buffers, output buffers, binding, run options)
        self._loras: tuple[tuple[LoraFile, float], ...] = ()
        self._weights: dict[str, tuple[np.ndarray, Any]] = {}  # external initializer -> (merged array, OrtValue)
        self._linears = None  # runtime.lora.GraphLinears of the graph, found once

    def providers(self) -> list:
        if self.backend == "ort-cpu":
            return ["CPUExecutionProvider"]
        options = {"enable_cuda_graph": "1"} if self.cuda_graph else {}
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]

    def _activate(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise EngineError("ONNX Runtime is not installed: pip install 'fluxrt[ort]' (or 'fluxrt[ort-gpu]')") from None
        if not self.onnx_path.is_file():
            raise EngineError(f"{self.name}: ONNX file {self.onnx_path} is missing")
        if self.backend == "ort-cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineError(f"{self.name}: backend ort-cuda needs onnxruntime-gpu with CUDA; this onnxruntime "
                              f"offers {ort.get_available_providers()}")
        self._weights, graph = self.merged_weights(self._loras)
        self.session = self.make_session(self._weights, graph)

    def make_session(self, weights: Mapping[str, tuple[np.ndarray, Any]], graph: bytes | None = None):
        """An InferenceSession of the graph (or of ``graph``, a serialized copy of it), ``weights`` taking the place
        of its external initializers of those names; checked against the spec."""
        import onnxruntime as ort

        options = self.session_options or ort.SessionOptions()
        if self.custom_ops is not None:
            from fluxrt.runtime.ort_ops import check_library

            options.register_custom_ops_library(str(check_library(self.custom_ops, self.device)))
        if weights:
            options.add_external_initializers(list(weights), [value for _, value in weights.values()])
        if graph is not None:  # the copy's external data stays beside the graph file
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(self.onnx_path.parent.resolve()))
        try:
            extra = {"disabled_optimizers": list(self.disabled_optimizers)} if self.disabled_optimizers else {}
            session = ort.InferenceSession(graph if graph is not None else str(self.onnx_path), options,
                                           providers=self.providers(), **extra)
        except Exception as e:  # onnxruntime raises its own untyped errors for unreadable graphs
            raise EngineError(f"{self.name}: ONNX Runtime could not load {self.onnx_path}: {e}") from None
        got = [i.name for i in session.get_inputs()]
        outs = [o.name for o in session.get_outputs()]
        if got != self.spec.input_names or outs != self.spec.output_names:
            raise EngineError(f"{self.name}: {self.onnx_path} has inputs {got} and outputs {outs}, expected "
                              f"{self.spec.input_names} and {self.spec.output_names} (is it the {self.name} graph?)")
        self.check_declared(session.get_inputs(), self.spec.inputs)
        self.check_declared(session.get_outputs(), self.spec.outputs)
        return session

    def set_loras(self, loras: Sequence[tuple[LoraFile, float]]) -> None:
        """Checked against the graph's linears now; on an active runner the session is remade with the merged
        weights (its CUDA graphs, captured with the old ones, dropped). The new session is made before the old
        one is let go (both in memory for a moment), so a failure leaves the runner as it was."""
        loras = tuple(loras)
        if self.session_options is not None:
            raise InvalidInputError(f"{self.name} ({self.backend}): this runner was given its own session options; "
                                    f"LoRA weights go into options the runner makes for each session")
        if loras:
            self.linears().check(loras)
        with self._lock:
            if self._active:
                try:
                    weights, graph = self.merged_weights(loras)
                    session = self.make_session(weights, graph)
                except FluxRTError:
                    raise
                except Exception as e:  # the backend library's own errors, out-of-memory included
                    raise backend_error(self, "loading LoRA weights", e) from e
                self.session, self._weights, self._graph_io = session, weights, {}
            self._loras = loras

    def linears(self):
        """Where each linear's weight lives in the graph (runtime/lora.py), found on first use."""
        if self._linears is None:
            from fluxrt.runtime.lora import graph_linears

            self._linears = graph_linears(self.onnx_path)
        return self._linears

    def merged_weights(self, loras: Sequence[tuple[LoraFile, float]]) -> tuple[dict[str, tuple[np.ndarray, Any]],
                                                                              bytes | None]:
        """The merged weights as ONNX Runtime takes them before it optimizes the graph (``add_initializer``'s are
        applied after, and lost wherever a pass has folded the weight into a new tensor, as the CPU's casts of
        fp16 weights do): those stored in external data as ``{initializer: (array, an OrtValue over it)}``, the
        array kept as long as the session (the OrtValue does not own it); inline ones written into a serialized
        copy of the graph (None when there are none)."""
        if not loras:
            return {}, None
        import onnxruntime as ort

        from fluxrt.runtime.lora import graph_with

        linears = self.linears()
        merged = linears.merged(loras)
        inline = {name: w for name, w in merged.items() if name in linears.inline}
        external = {name: (w, ort.OrtValue.ortvalue_from_numpy_with_onnx_type(dtypes.as_bits(w),
                                                                               DTYPES[str(w.dtype)].onnx))
                    for name, w in merged.items() if name not in inline}
        return external, graph_with(self.onnx_path, inline) if inline else None

    def check_declared(self, declared, specs) -> None:
        """Each tensor's element type and fixed sizes as the graph declares them against the folder's description
        of it (its precision and dims): an edited manifest is refused here, before anything runs."""
        from fluxrt.dtypes import BY_ORT

        for value, spec in zip(declared, specs):
            want = spec.resolved_dtype(self.precision)
            have = BY_ORT.get(value.type, value.type)
            if have != want:
                raise EngineError(f"{self.name}: {self.onnx_path} declares {spec.name!r} as {have}, but the folder "
                                  f"says {want} ({self.precision} graph): the manifest does not describe this graph")
            shape = list(value.shape or [])
            fixed = [(i, d, s) for i, (d, s) in enumerate(zip(shape, spec.shape)) if isinstance(d, int)
                     and isinstance(s, int) and d != s]
            if len(shape) != len(spec.shape) or fixed:
                raise EngineError(f"{self.name}: {self.onnx_path} declares {spec.name!r} with shape {shape}, but the "
                                  f"folder's dims give {list(spec.shape)}: the manifest does not describe this graph")

    def _deactivate(self) -> None:
        self.session = None
        self._graph_io = {}
        self._weights = {}

    def _infer(self, feed: Mapping[str, Array]) -> dict[str, Array]:
        if self.device == "cpu":
            outs = self.session.run(self.spec.output_names, {k: np.ascontiguousarray(v) for k, v in feed.items()})
            return dict(zip(self.spec.output_names, outs))
        if self.cuda_graph:
            return self._infer_cuda_graph(feed)
        return self._infer_cuda(feed)

    def element_type(self, name: str, x: Array):
        if self.input_dtype(name) == "bfloat16":
            return ONNX_BFLOAT16  # cupy holds the bits as uint16
        return np_dtype(x.dtype)

    def _infer_cuda(self, feed: Mapping[str, Array]) -> dict[str, Array]:
        import cupy

        binding = self.session.io_binding()
        keep = []
        for name, x in feed.items():
            x = cupy.ascontiguousarray(dtypes.to_cupy(x))
            keep.append(x)
            binding.bind_input(name, "cuda", x.device.id, self.element_type(name, x), list(x.shape), x.data.ptr)
        for name in self.spec.output_names:
            binding.bind_output(name, "cuda")
        cupy.cuda.get_current_stream().synchronize()
        self.session.run_with_iobinding(binding)
        return {name: ortvalue_to_cupy(v) for name, v in zip(self.spec.output_names, binding.get_outputs())}

    def _infer_cuda_graph(self, feed: Mapping[str, Array]) -> dict[str, Array]:
        """One captured graph per input shape (ONNX Runtime's ``gpu_graph_id``), each with its own
        fixed buffers; a new shape is captured on first use, up to ``max_cuda_graphs`` of them."""
        import cupy
        import onnxruntime as ort

        shapes = tuple(sorted((k, tuple(v.shape)) for k, v in feed.items()))
        with self._lock:  # a graph replays into its own buffers: one call at a time
            graphs = self._graph_io
            if shapes not in graphs:
                if len(graphs) >= self.max_cuda_graphs:
                    raise InvalidInputError(
                        f"{self.name}: {len(graphs)} CUDA graphs already captured (shapes "
                        f"{[dict(k) for k in graphs]}); a new shape {dict(shapes)} needs another: raise "
                        f"max_cuda_graphs (FluxPipeline.load(..., max_cuda_graphs=N)) or load the pipeline without "
                        f"CUDA graphs")
                run_options = ort.RunOptions()  # ids from 1: ONNX Runtime reserves 0 for its own use
                run_options.add_run_config_entry("gpu_graph_id", str(len(graphs) + 1))
                graphs[shapes] = (*self._capture(feed), run_options)
            inputs, outputs, binding, run_options = graphs[shapes]
            for name, x in feed.items():
                x = dtypes.to_cupy(x)
                if x.dtype != inputs[name].dtype:  # a value cast into the captured buffer would be silent
                    raise InvalidInputError(f"{self.name}: input {name!r} has dtype {x.dtype}; the CUDA graph "
                                            f"captured for this shape binds {inputs[name].dtype}")
                inputs[name][...] = x
            cupy.cuda.get_current_stream().synchronize()
            self.session.run_with_iobinding(binding, run_options)
            return {k: v.copy() for k, v in outputs.items()}

    def _capture(self, feed: Mapping[str, Array]):
        import cupy

        binding = self.session.io_binding()
        inputs = {k: cupy.array(dtypes.to_cupy(v)) for k, v in feed.items()}
        for name, x in inputs.items():
            binding.bind_input(name, "cuda", x.device.id, self.element_type(name, x), list(x.shape), x.data.ptr)
        outputs = {}
        for value, (name, shape) in zip(self.session.get_outputs(), output_shapes(self.spec, feed).items()):
            onnx_type = BY_ORT[value.type]
            out = cupy.empty(shape, dtype="uint16" if onnx_type == "bfloat16" else onnx_type)
            element = ONNX_BFLOAT16 if onnx_type == "bfloat16" else np_dtype(out.dtype)
            binding.bind_output(name, "cuda", out.device.id, element, list(out.shape), out.data.ptr)
            outputs[name] = out
        return inputs, outputs, binding


def output_shapes(spec: ComponentSpec, feed: Mapping[str, Array]) -> dict[str, tuple[int, ...]]:
    """Output shapes from the spec's named axes, sized by the feed (``8*h`` style expressions too)."""
    sizes: dict[str, int] = {}
    for t in spec.inputs:
        for d, n in zip(t.shape, feed[t.name].shape):
            if isinstance(d, str):
                sizes[d] = int(n)
    out = {}
    for t in spec.outputs:
        shape = []
        for d in t.shape:
            if isinstance(d, int):
                shape.append(d)
            elif d in sizes:
                shape.append(sizes[d])
            elif "*" in d:
                k, axis = d.split("*")
                shape.append(int(k) * sizes[axis])
            else:
                axis, k = d.split("/")
                shape.append(sizes[axis] // int(k))
        out[t.name] = tuple(shape)
    return out


ONNX_BFLOAT16 = DTYPES["bfloat16"].onnx  # ORT's I/O binding takes bfloat16 buffers by ONNX element type


def np_dtype(dtype) -> Any:
    return np.dtype(dtype).type


def ortvalue_to_cupy(value) -> Array:
    """Wrap an ORT-owned CUDA buffer as a cupy array without copying; the OrtValue stays alive
    through the memory object's owner reference.  cupy has no bfloat16: such outputs come back
    as uint16 bit patterns (see ``fluxrt.dtypes``)."""
    import cupy

    dtype = np.dtype(DTYPES[BY_ORT[value.data_type()]].cupy)
    shape = value.shape()
    nbytes = int(np.prod(shape)) * dtype.itemsize
    mem = cupy.cuda.UnownedMemory(value.data_ptr(), nbytes, value)
    return cupy.ndarray(shape, dtype=dtype, memptr=cupy.cuda.MemoryPointer(mem, 0))
