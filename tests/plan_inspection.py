"""Test helper: read a plan's I/O tensors and profile shapes back from the plan itself.

This deserializes the engine, which needs a CUDA driver and a GPU the plan was built for:
TensorRT-RTX builds on a machine without a GPU, but its runtime cannot even deserialize
there.  Without a GPU, the build record's ``io`` (read from the network and the profile
object at build time) is the description of the plan; it has the same layout as this.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from fluxrt.dtypes import from_trt
from fluxrt.errors import EngineError
from fluxrt.trt import import_trt, library_name, make_logger


def inspect_plan(plan_path: str | Path, trt_module: ModuleType | None = None) -> dict:
    """``{"inputs": [{name, dtype, shape, profile: [min, opt, max]}], "outputs": [...], "num_profiles"}``.

    Shapes use -1 for dynamic axes; profile shapes are those of profile 0.
    """
    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise EngineError(f"engine plan {plan_path} does not exist")
    trt = trt_module or import_trt()
    logger = make_logger(trt)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise EngineError(f"{library_name(trt)} {trt.__version__} could not deserialize {plan_path} "
                          f"(it needs a CUDA driver and a GPU the plan was built for): "
                          f"{'; '.join(logger.errors) or 'no message'}")
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        entry = {"name": name, "dtype": from_trt(engine.get_tensor_dtype(name)),
                 "shape": list(engine.get_tensor_shape(name))}
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            entry["profile"] = [list(s) for s in engine.get_tensor_profile_shape(name, 0)]
            inputs.append(entry)
        else:
            outputs.append(entry)
    return {"inputs": inputs, "outputs": outputs, "num_profiles": engine.num_optimization_profiles}
