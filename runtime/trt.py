"""The TensorRT backend (``trt``): one plan behind the runner interface, with either the
``tensorrt`` module or ``tensorrt_rtx_bindings``.  Inputs and outputs are CuPy arrays on the
GPU (numpy inputs are copied up once); execution is enqueued on CuPy's current stream.
cupy has no bfloat16: bf16 tensors travel as uint16 bit patterns (see ``fluxrt.dtypes``).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Mapping

from fluxrt.artifacts import EngineFolder, current_gpu
from fluxrt.components import ComponentSpec
from fluxrt import dtypes
from fluxrt.dtypes import DTYPES, Array, from_trt
from fluxrt.errors import EngineError, InvalidInputError
from fluxrt.runner import Runner
from fluxrt.trt import import_trt, library_info, make_logger


class TrtRunner(Runner):
    backend = "trt"
    device = "cuda"

    def __init__(self, spec: ComponentSpec, precision: str, plan_path: str | Path,
                 trt_module: ModuleType | None = None):
        super().__init__(spec, precision)
        self.plan_path = Path(plan_path)
        self.trt_module = trt_module
        self.engine = self.context = None

    @classmethod
    def from_engine_folder(cls, folder: EngineFolder, name: str, trt_module: ModuleType | None = None) -> "TrtRunner":
        """The plan of ``name``, verified (bytes, build, library, GPU) once, here; loaded by ``activate``."""
        trt = trt_module or import_trt()
        plan = folder.verify_plan(name, library_info(trt), current_gpu())
        return cls(folder.spec(name), folder.graph_precision(name), plan, trt)

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
        self.context = engine.create_execution_context()

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
