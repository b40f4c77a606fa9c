"""The TensorRT backend (``trt``): one plan behind the runner interface, with either the
``tensorrt`` module or ``tensorrt_rtx_bindings``.  Inputs and outputs are CuPy arrays on the
GPU (numpy inputs are copied up once); execution is enqueued on CuPy's current stream.
cupy has no bfloat16: bf16 tensors travel as uint16 bit patterns (see ``fluxrt.dtypes``).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Mapping, Sequence

import numpy as np

from fluxrt.artifacts import EngineFolder, ExportFolder, current_gpu
from fluxrt.components import ComponentSpec
from fluxrt import dtypes
from fluxrt.dtypes import DTYPES, Array, from_trt
from fluxrt.errors import EngineError, FluxRTError, InvalidInputError
from fluxrt.lora import LoraFile
from fluxrt.runner import Runner, backend_error
from fluxrt.trt import import_trt, library_info, make_logger


class TrtRunner(Runner):
    backend = "trt"
    device = "cuda"

    def __init__(self, spec: ComponentSpec, precision: str, plan_path: str | Path,
                 trt_module: ModuleType | None = None, refit_source: Path | str | None = None):
        """``refit_source``: the ONNX graph a refittable plan was built from (its pristine weights, which LoRA
        updates are merged into), or why the plan cannot take LoRA weights (a message); None: not refittable."""
        super().__init__(spec, precision)
        self.plan_path = Path(plan_path)
        self.trt_module = trt_module
        self.engine = self.context = None
        self.refit_source = refit_source
        self._loras: tuple[tuple[LoraFile, float], ...] = ()
        self._linears = None

    @classmethod
    def from_engine_folder(cls, folder: EngineFolder, name: str, trt_module: ModuleType | None = None) -> "TrtRunner":
        """The plan of ``name``, verified (bytes, build, library, GPU) once, here; loaded by ``activate``."""
        trt = trt_module or import_trt()
        plan = folder.verify_plan(name, library_info(trt), current_gpu())
        return cls(folder.spec(name), folder.graph_precision(name), plan, trt, refit_source(folder, name))

    def _activate(self) -> None:
        trt = self.trt_module or import_trt()
        self.trt_module = trt
        logger = make_logger(trt)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if engine is None:
            raise EngineError(f"{self.name}: {trt.__name__} could not deserialize {self.plan_path}: "
                              f"{'; '.join(logger.errors) or 'no message'}")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != self.spec.input_names:
            raise EngineError(f"{self.name}: plan {self.plan_path} has inputs {inputs}, expected "
                              f"{self.spec.input_names} (is it the {self.name} plan?)")
        self.runtime, self.engine, self.logger = runtime, engine, logger
        if self._loras:  # a fresh engine holds the plan's own weights
            self.refit(self._loras, ())
        self.context = engine.create_execution_context()

    # ---- LoRA by the refitter -----------------------------------------------------------------------
    def set_loras(self, loras: Sequence[tuple[LoraFile, float]]) -> None:
        """Checked against the source graph's linears now; on an active runner the engine's weights are replaced
        in place by TensorRT's refitter: the LoRAs' linears get ``W + Σ scale·m·(up @ down)`` merged from the
        source graph's own weights (runtime/lora.py, as on ONNX Runtime), the linears of LoRAs dropped since get
        those weights back. Plans built without ``fluxrt build --refittable`` refuse."""
        loras = tuple(loras)
        if not loras and not self._loras:
            return
        if not isinstance(self.refit_source, Path):
            reason = self.refit_source or (f"plan {self.plan_path} was built without --refittable, so TensorRT "
                                           f"cannot change its weights")
            raise InvalidInputError(f"{self.name} ({self.backend}): {reason}; rebuild it with fluxrt build ... "
                                    f"--refittable (fp16/bf16), or run the export folder on ort-cuda for LoRA")
        if loras:
            self.linears().check(loras)
        with self._lock:
            if self._active:
                self.refit(loras, self._loras)
            self._loras = loras

    def linears(self):
        if self._linears is None:
            from fluxrt.runtime.lora import graph_linears

            self._linears = graph_linears(self.refit_source)
        return self._linears

    def refit(self, loras, before) -> None:
        """The weights of every linear ``loras`` or ``before`` target, merged (or the source's own), refitted."""
        trt = self.trt_module
        modules = {m for lora, _ in (*loras, *before) for m in lora.deltas}
        try:
            weights = self.linears().merged(loras, modules)
            refitter = trt.Refitter(self.engine, self.logger)
            keep = []
            for name, w in weights.items():
                w = np.ascontiguousarray(dtypes.as_bits(w))
                keep.append(w)
                kind = trt.DataType.BF16 if str(weights[name].dtype) == "bfloat16" else None
                given = trt.Weights(kind, w.ctypes.data, w.size) if kind is not None else trt.Weights(w)
                if not refitter.set_named_weights(name, given):
                    raise EngineError(f"{self.name}: plan {self.plan_path} has no refittable weight {name!r} (the "
                                      f"source graph {self.refit_source}'s initializer): "
                                      f"{'; '.join(self.logger.errors) or 'no message'}")
            missing = list(refitter.get_missing_weights())
            if missing:
                raise EngineError(f"{self.name}: TensorRT's refitter wants {len(missing)} more weights "
                                  f"({missing[:4]}...) that a LoRA does not change")
            if not refitter.refit_cuda_engine():
                raise EngineError(f"{self.name}: TensorRT could not refit {self.plan_path}: "
                                  f"{'; '.join(self.logger.errors) or 'no message'}")
        except FluxRTError:
            raise
        except Exception as e:  # the library's own errors, out-of-memory included
            raise backend_error(self, "refitting LoRA weights", e) from e

    def _deactivate(self) -> None:
        self.context = self.engine = None

    def check_profile(self, feed: Mapping[str, Array]) -> None:
        for t in self.spec.inputs:
            lo, _, hi = self.engine.get_tensor_profile_shape(t.name, 0)
            shape = tuple(feed[t.name].shape)
            if any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
                raise InvalidInputError(f"{self.name}: input {t.name!r} of shape {shape} is outside the engine's "
                                        f"profile {tuple(lo)}..{tuple(hi)} (rebuild with a wider envelope)")

    def _infer(self, feed: Mapping[str, Array]) -> dict[str, Array]:
        import cupy

        self.check_profile(feed)
        stream = cupy.cuda.get_current_stream()
        keep = []
        with self._lock:  # one execution context: calls on it are serialized
            for name in self.spec.input_names:
                x = cupy.ascontiguousarray(dtypes.to_cupy(feed[name]))  # bfloat16 as its bits
                keep.append(x)
                self.context.set_input_shape(name, tuple(x.shape))
                self.context.set_tensor_address(name, x.data.ptr)
            outputs = {}
            for name in self.spec.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = DTYPES[from_trt(self.engine.get_tensor_dtype(name))].cupy
                out = cupy.empty(shape, dtype=dtype)
                self.context.set_tensor_address(name, out.data.ptr)
                outputs[name] = out
            if not self.context.execute_async_v3(stream.ptr):
                raise EngineError(f"{self.name}: TensorRT execution failed: {'; '.join(self.logger.errors)}")
            stream.synchronize()
        return outputs


def refit_source(folder: EngineFolder, name: str) -> Path | str | None:
    """The ONNX graph of the export a refittable plan was built from, checked to be that graph still (the
    export manifest's fingerprint against the plan's sidecar); a message saying why not; None when the plan
    was not built refittable."""
    meta = folder.sidecar(name)
    if not meta.get("refittable"):
        return None
    export = (folder.meta.get("export") or {}).get("path")
    try:
        source = ExportFolder.open(export)
        recorded = source.record(name)["fingerprint"]["sha256"]
        path = source.graph_path(name)
    except (FluxRTError, KeyError, TypeError) as e:
        return (f"a refit merges LoRA updates into the weights of the export the plan was built from, {export}, "
                f"which cannot be read ({e})")
    if recorded != meta.get("onnx_fingerprint"):
        return (f"the export folder {export} no longer holds the {name} graph plan {folder.root} was built from "
                f"(exported again since?)")
    return path
