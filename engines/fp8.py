"""FP8 (E4M3) post-training quantization of an exported component, from the export folder alone.

1. Capture: the runtime's own ``FluxPipeline`` samples the calibration prompts over the folder's
   graphs; a recording runner stands in for the component's runner and keeps every feed it is
   given (transformer: one per denoising step; T5: one per prompt).
2. Select: the linears to quantize, by torch module path.  The exporter (``torch.onnx``, dynamo)
   tags every node with the name scopes of the module it came from; a MatMul/Gemm of a
   ``torch.nn.Linear`` with a constant weight whose path matches the component's rule is taken.
   Transformer: the linears of the double and single blocks (attention projections, MLPs) except
   the AdaLN modulation linears; the embedders (``x_embedder``, ``context_embedder``,
   ``time_text_embed``) and the final ``norm_out`` / ``proj_out`` keep the graph's precision, and
   so do the attention score and value products, which are not linears.
3. Quantize: NVIDIA ModelOpt's ONNX PTQ (``quantize_mode="fp8"``, max calibration) over the
   captured feeds: one activation scale per tensor, one weight scale per output channel, and a
   QuantizeLinear/DequantizeLinear pair with a FLOAT8E4M3FN zero point on both inputs of each
   selected linear; the scales are then normalized to ``amax / 448`` (see
   :func:`rescale_to_fp8_range`), and each weight's QuantizeLinear is replaced by the E4M3 tensor it
   computes (:func:`store_fp8_weights`), so the graph stores FP8 weights.  TensorRT fuses each
   DequantizeLinear pair into an FP8 GEMM.
4. Write: every linear's MatMul/Gemm node is renamed to its module path, the graph is checked
   to keep the component's input and output names and dtypes, and it is written under a
   temporary name and renamed (``NAME.onnx.data`` beside it over 2 GB), with a provenance
   record ``NAME.json`` (``transformer.fp8.onnx`` -> ``transformer.fp8.json``) holding the returned
   record: the settings, the source graph's fingerprint and the new graph's own, written last.

Calibration runs every prompt through the whole sampling loop, so for a real model it is meant
for a GPU (``backend="ort-cuda"``, which also calibrates on CUDA); on CPU keep it to the tiny
model.  Disk: a copy of the source graph and ModelOpt's intermediate copies (some under TMPDIR).
Needs ``nvidia-modelopt`` with its ONNX-side dependencies named one by one: its ``[onnx]`` extra
pins onnx 1.21 and onnxruntime-gpu.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fluxrt.artifacts import EXTERNAL_DATA_BYTES, ExportFolder, graph_fingerprint
from fluxrt.components import STAGES, VARIANT_DEFAULTS
from fluxrt.dtypes import Array, array_module
from fluxrt.errors import EngineError, ExportError
from fluxrt.node_origin import LINEAR_CLASSES, module_origin
from fluxrt.files import atomic_write_json
from fluxrt.runner import Runner

PROMPTS_FILE = "calibration_prompts.txt"
BACKENDS = ("ort-cpu", "ort-cuda")


@dataclass(frozen=True)
class QuantRule:
    """Which linears of a component get FP8: ``include`` matches module paths, ``exclude`` maps a
    pattern to the reason it stays in the graph's precision."""

    include: str
    outside: str  # the reason a linear that ``include`` does not match stays unquantized
    exclude: tuple[tuple[str, str], ...] = ()

    def reason_to_skip(self, path: str) -> str | None:
        if not re.search(self.include, path):
            return self.outside
        for pattern, reason in self.exclude:
            if re.search(pattern, path):
                return reason
        return None


RULES = {
    "transformer": QuantRule(
        include=r"^model\.(transformer_blocks|single_transformer_blocks)\.\d+\.",
        outside="outside the blocks (embedder or final projection)",
        exclude=((r"\.norm1(_context)?\.linear$|\.norm\.linear$",
                  "AdaLN modulation: a GEMV over the batch, no FP8 gain and precision-sensitive"),),
    ),
    "t5": QuantRule(
        include=r"^model\.encoder\.block\.\d+\.",
        outside="outside the encoder blocks",
        exclude=((r"\.DenseReluDense\.wo$",
                  "feed-forward output projection: T5 v1.1's outlier activations (kept fp32 even in fp16 exports)"),),
    ),
}


def check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Fp8Settings.{name} must be a positive integer{' or None' if allow_none else ''}, "
                         f"got {value!r}")


@dataclass(frozen=True)
class Fp8Settings:
    """How calibration samples are made.  ``None`` means the variant's published default, which
    :meth:`resolve` fills in and the record stores."""

    num_prompts: int = 64  # the first N prompts (of the bundled file unless prompts are given)
    num_inference_steps: int | None = None  # None: 28 for dev, 4 for schnell
    height: int = 1024
    width: int = 1024
    max_sequence_length: int | None = None  # T5 tokens; None: 512 for dev, 256 for schnell
    guidance_scale: float | None = None  # dev only; None: 3.5
    seed: int = 0  # prompt i starts from the noise of seed + i
    backend: str = "ort-cpu"  # the runtime backend that runs the sampling loop: ort-cpu or ort-cuda
    fp8_attention: bool = False  # attention in FP8 too (fp8_ort: cuDNN's FP8 attention); ort-kernels exports only
    fused_products: bool = True  # linears sharing a quantized input as one matrix product (fp8_ort, ort-kernels)
    fast_accumulation: bool = False  # cuBLASLt's FP8 fast accumulation in every Fp8Linear (fp8_ort, ort-kernels)

    def __post_init__(self) -> None:
        check_positive_int("num_prompts", self.num_prompts)
        check_positive_int("num_inference_steps", self.num_inference_steps, allow_none=True)
        check_positive_int("max_sequence_length", self.max_sequence_length, allow_none=True)
        for name in ("height", "width"):
            value = getattr(self, name)
            check_positive_int(name, value)
            if value % 16:
                raise ValueError(f"Fp8Settings.{name} must be a multiple of 16 pixels, got {value}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Fp8Settings.seed must be a non-negative integer, got {self.seed!r}")
        if self.guidance_scale is not None and (
                isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float))
                or not np.isfinite(self.guidance_scale)):
            raise ValueError(f"Fp8Settings.guidance_scale must be a finite number or None, got {self.guidance_scale!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"Fp8Settings.backend {self.backend!r} is not one of {list(BACKENDS)}")
        if not isinstance(self.fp8_attention, bool):
            raise ValueError(f"Fp8Settings.fp8_attention must be True or False, got {self.fp8_attention!r}")
        if not isinstance(self.fused_products, bool):
            raise ValueError(f"Fp8Settings.fused_products must be True or False, got {self.fused_products!r}")
        if not isinstance(self.fast_accumulation, bool):
            raise ValueError(f"Fp8Settings.fast_accumulation must be True or False, got {self.fast_accumulation!r}")

    def resolve(self, variant: str) -> dict:
        """These settings with the variant's defaults filled in."""
        d = VARIANT_DEFAULTS[variant]
        if variant == "schnell" and self.guidance_scale is not None:
            raise ValueError(f"Fp8Settings.guidance_scale {self.guidance_scale!r}: FLUX.1-schnell has no guidance input")
        out = asdict(self)
        for key in ("num_inference_steps", "max_sequence_length", "guidance_scale"):
            if out[key] is None:
                out[key] = d[key]
        if out["guidance_scale"] is not None:
            out["guidance_scale"] = float(out["guidance_scale"])
        return out


# the recipe fluxrt's FP8 numbers are stated for: 64 bundled prompts, the variant's steps and text length, 1024 px
FULL_CALIBRATION = Fp8Settings()
# the default: minutes on the built-in tiny model on a CPU; a real model on a GPU wants --full-calibration
QUICK_CALIBRATION = Fp8Settings(num_prompts=8, num_inference_steps=4, height=512, width=512, max_sequence_length=128)


def bundled_prompts() -> list[str]:
    """The prompts shipped in ``engines/calibration_prompts.txt``, in file order."""
    text = resources.files("fluxrt.engines").joinpath(PROMPTS_FILE).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def check_calibration(settings: Fp8Settings, export: ExportFolder) -> None:
    """What ``export`` allows of the calibration ``settings`` (bundled prompts), refused before anything is
    written: as many prompts as are bundled, guidance only for dev, a text length the model takes."""
    try:
        pick_prompts(None, settings.num_prompts)
        resolved = settings.resolve(export.variant)
    except ValueError as e:
        raise EngineError(str(e)) from None
    attention = export.manifest.get("components", {}).get("transformer", {}).get("attention")
    if settings.fp8_attention and attention != "ort-kernels":
        raise EngineError(f"Fp8Settings.fp8_attention: FP8 attention is fluxrt's own op (Fp8Attention), for a "
                          f"transformer exported with --attention ort-kernels; {export.root} has attention "
                          f"{attention or 'portable'}")
    if not settings.fused_products and attention != "ort-kernels":
        raise EngineError(f"Fp8Settings.fused_products: fused products are a rewrite onto fluxrt's own FP8 ops, for a "
                          f"transformer exported with --attention ort-kernels; {export.root} has attention "
                          f"{attention or 'portable'}, whose FP8 graph has none to turn off")
    if settings.fast_accumulation and attention != "ort-kernels":
        raise EngineError(f"Fp8Settings.fast_accumulation: fast accumulation is an attribute of fluxrt's own FP8 "
                          f"product (Fp8Linear), for a transformer exported with --attention ort-kernels; {export.root} "
                          f"has attention {attention or 'portable'} (TensorRT picks its own accumulation)")
    top = export.dims.t5_max_length
    if resolved["max_sequence_length"] > top:
        raise EngineError(f"Fp8Settings.max_sequence_length {resolved['max_sequence_length']} exceeds the {top} T5 "
                          f"tokens the model takes")


def pick_prompts(prompts: Sequence[str] | None, count: int) -> list[str]:
    source = "the bundled prompts" if prompts is None else "the given prompts"
    pool = bundled_prompts() if prompts is None else list(prompts)
    if isinstance(prompts, str) or not all(isinstance(p, str) and p.strip() for p in pool):
        raise ValueError(f"prompts must be a list of non-empty strings, got {prompts!r}")
    if count > len(pool):
        raise ValueError(f"Fp8Settings.num_prompts is {count}, but {source} hold only {len(pool)}")
    return pool[:count]


# ---------------------------------------------------------------- capture

def host_copy(x: Array) -> np.ndarray:
    return np.array(x, copy=True) if array_module(x) is np else x.get()


class RecordingRunner(Runner):
    """Runs ``inner`` and keeps a host copy of every feed, the calibration samples.

    An input given as the same array as in the previous call (the text embeddings, the ids,
    across the steps of one prompt) shares the previous copy instead of being copied again.
    """

    def __init__(self, inner: Runner):
        super().__init__(inner.spec, inner.precision)
        self.inner = inner
        self.backend = inner.backend
        self.device = inner.device
        self.feeds: list[dict[str, np.ndarray]] = []
        self._previous: dict[str, tuple[Array, np.ndarray]] = {}  # name -> (array given, its copy)

    def _activate(self) -> None:
        self.inner.activate()

    def _deactivate(self) -> None:
        self.inner.deactivate()

    def input_dtype(self, name: str) -> str:
        return self.inner.input_dtype(name)

    def _infer(self, feed: Mapping[str, Array]) -> dict[str, Array]:
        sample = {}
        for name, x in feed.items():
            given, copy = self._previous.get(name, (None, None))
            sample[name] = copy if x is given else host_copy(x)
            self._previous[name] = (x, sample[name])
        self.feeds.append(sample)
        return self.inner.infer(feed)


def open_export(export_dir: Path, component: str) -> ExportFolder:
    """The export folder, with every graph the sampling loop needs (each runs); errors as EngineError."""
    what = f"FP8 calibration of {component}"
    if not export_dir.is_dir():
        raise EngineError(f"{what}: export folder {export_dir} does not exist")
    try:
        folder = ExportFolder.open(export_dir)
        for name in dict.fromkeys((component,) + STAGES):
            folder.graph_path(name)
    except ExportError as e:
        raise EngineError(f"{what}: {e}") from None
    return folder


def capture_feeds(export_dir: str | Path, prompts: Sequence[str], settings: Fp8Settings,
                  component: str = "transformer") -> list[dict[str, np.ndarray]]:
    """Run the sampling loop on ``prompts`` and return ``component``'s feeds, in call order."""
    from fluxrt.runtime.backends import make_runners
    from fluxrt.runtime.pipeline import FluxPipeline
    from fluxrt.runtime.tokenizer import PromptTruncatedWarning

    check_component(component)
    folder = open_export(Path(export_dir), component)
    p = settings.resolve(folder.variant)
    runners = make_runners(folder, settings.backend)
    recorder = RecordingRunner(runners[component])
    pipe = FluxPipeline(folder, {**runners, component: recorder})
    with warnings.catch_warnings():
        # long prompts cut at a short max_sequence_length are still valid samples: that is what
        # the model sees at that length
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        for i, prompt in enumerate(prompts):
            if component == "t5":  # the denoising loop adds nothing to T5's inputs
                pipe.encode_prompts([prompt], p["max_sequence_length"])
            else:
                pipe(prompt, height=p["height"], width=p["width"], num_inference_steps=p["num_inference_steps"],
                     guidance_scale=p["guidance_scale"], max_sequence_length=p["max_sequence_length"],
                     seed=p["seed"] + i, output_type="np")
    return recorder.feeds


def check_component(component: str) -> None:
    if component not in RULES:
        raise ValueError(f"FP8 quantization of component {component!r} is not supported; "
                         f"supported components are {list(RULES)}")


# ---------------------------------------------------------------- selection

def find_linears(model, what: str) -> dict[str, str]:
    """``{node name: module path}`` of every MatMul/Gemm that is a torch Linear with a constant weight
    (not the attention products, which multiply two activations)."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    linears, tagged = {}, 0
    for node in model.graph.node:
        origin = module_origin(node) if node.op_type in ("MatMul", "Gemm") else None
        if origin is None:
            continue
        tagged += 1
        path, cls = origin
        if cls in LINEAR_CLASSES and node.input[1] in constants:
            linears[node.name] = path
    if not tagged:
        raise EngineError(f"{what}: no MatMul/Gemm node carries torch.onnx's module-scope metadata, so the linears "
                          f"cannot be told apart; re-export the graph with fluxrt export")
    if len(set(linears.values())) != len(linears):
        raise EngineError(f"{what}: several MatMul/Gemm nodes come from one linear; cannot name them by module")
    return linears


def select_linears(linears: dict[str, str], component: str, what: str) -> tuple[dict[str, str], dict[str, str]]:
    """``({node name: module path} to quantize, {module path: reason} left out)``."""
    selected, excluded = {}, {}
    for name, path in linears.items():
        reason = RULES[component].reason_to_skip(path)
        if reason is None:
            selected[name] = path
        else:
            excluded[path] = reason
    if not selected:
        raise EngineError(f"{what}: no linear matches the {component} rule {RULES[component].include!r}")
    return selected, excluded


# ---------------------------------------------------------------- quantization

def import_modelopt():
    try:
        import modelopt
        from modelopt.onnx.quantization import quantize
    except ImportError as e:
        raise EngineError(f"FP8 quantization needs NVIDIA ModelOpt's ONNX quantizer, which could not be imported "
                          f"({e}); install the fp8 extra (nvidia-modelopt and its ONNX dependencies)") from None
    return modelopt.__version__, quantize


def calibration_reader(feeds: list[dict[str, np.ndarray]]):
    """The captured feeds as an ONNX Runtime ``CalibrationDataReader``, which ModelOpt calibrates from."""
    from onnxruntime.quantization import CalibrationDataReader

    class CapturedFeeds(CalibrationDataReader):
        def __init__(self):
            self.index = 0

        def get_next(self) -> dict | None:
            if self.index >= len(feeds):
                return None
            self.index += 1
            return feeds[self.index - 1]

        def get_first(self) -> dict:
            return feeds[0]

        def rewind(self) -> None:
            self.index = 0

    return CapturedFeeds()


def stage_source(source: Path, files: list[str], staging: Path) -> Path:
    """Copy the source graph's files (the graph and its external data) into ``staging``: ModelOpt
    rewrites the graph it is given in place (shape inference) and writes intermediate files beside
    it, and the export folder must stay as it is.  A link would let it write through."""
    for name in files:
        shutil.copyfile(source.parent / name, staging / name)
    return staging / source.name


class DropRecords(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def quiet_modelopt():
    """A good FP8 build prints fluxrt's progress only. ModelOpt logs an ERROR when NVML is absent although
    it only uses the GPU count to tune ONNX Runtime's arena shrinkage (calibration runs where fluxrt said);
    onnx-graphsurgeon warns that it has no numpy type for FLOAT8E4M3FN (it keeps the ONNX type, as wanted)
    and that the ``colored`` module is missing. Errors of both still show."""
    log = logging.getLogger("modelopt.onnx")
    drop = DropRecords("Failed to get GPU count")
    log.addFilter(drop)
    try:
        from onnx_graphsurgeon.logger import G_LOGGER
    except ImportError:
        G_LOGGER = None
    severity = G_LOGGER.severity if G_LOGGER is not None else None
    if G_LOGGER is not None:
        G_LOGGER.severity = G_LOGGER.ERROR
    try:
        yield
    finally:
        log.removeFilter(drop)
        if G_LOGGER is not None:
            G_LOGGER.severity = severity


def run_modelopt(quantize, source: Path, out: Path, feeds, selected: dict[str, str], backend: str,
                 external: bool) -> None:
    eps = ["cuda:0", "cpu"] if backend == "ort-cuda" else ["cpu"]
    with quiet_modelopt():
        quantize_with_modelopt(quantize, source, out, feeds, selected, eps, external)


def quantize_with_modelopt(quantize, source: Path, out: Path, feeds, selected: dict[str, str], eps: list[str],
                           external: bool) -> None:
    quantize(
        str(source), quantize_mode="fp8", calibration_data_reader=calibration_reader(feeds),
        calibration_method="max",  # ModelOpt makes FP8 scales from INT8 ones, which is exact only for max
        calibration_eps=eps, op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_quantize=[f"^{re.escape(n)}$" for n in selected], disable_mha_qdq=True,
        high_precision_dtype="fp32",  # "fp32" leaves every tensor in the graph's own dtype (no conversion)
        use_external_data_format=external, output_path=str(out), log_level="WARNING",
    )


def quantize_kernels(source: Path, feeds, selected: dict[str, str], backend: str, what: str, attention: bool = False,
                     fuse: bool = True, fast_accumulation: bool = False):
    """An ort-kernels graph on fluxrt's FP8 ops (fp8_ort): calibrated by running it, with the op library,
    on ``feeds``; returns (model, module paths quantized, module paths left out). ``attention``: FP8 attention
    too; ``fuse``: linears sharing a quantized input as one product; ``fast_accumulation``: cuBLASLt's FP8 fast
    accumulation in every product."""
    import onnx

    from fluxrt.engines import fp8_ort

    model = onnx.load(str(source), load_external_data=False)
    linears = fp8_ort.kernel_linears(model, selected, what)
    tensors = list(dict.fromkeys(lin.input for lin in linears))
    if attention:
        tensors += [t for t in fp8_ort.attention_inputs(model) if t not in tensors]
    amax = fp8_ort.activation_amax(model, tensors, feeds, backend, source.parent)
    # the weights are read in place from the source's data file (memory-mapped, on every core); the
    # initializers the rewrite keeps stay external until write_graph copies their bytes
    scales = fp8_ort.Scales(amax, fp8_ort.weight_amax(model, linears, source.parent))
    fp8_ort.fp8_graph(model, linears, scales, source.parent, attention=attention, fuse=fuse,
                      fast_accumulation=fast_accumulation)
    return model, sorted(lin.path for lin in linears), []


def producer_ops(model) -> dict[str, str]:
    return {o: n.op_type for n in model.graph.node for o in n.output}


def quantized_linears(model, selected: dict[str, str]) -> tuple[list[str], list[str]]:
    """Module paths of the selected linears whose two inputs are dequantized, and of those that are not."""
    made_by = producer_ops(model)
    nodes = {n.name: n for n in model.graph.node}
    done, missed = [], []
    for name, path in selected.items():
        node = nodes.get(name)
        ok = node is not None and all(made_by.get(i) == "DequantizeLinear" for i in node.input[:2])
        (done if ok else missed).append(path)
    return done, missed


def rescale_to_fp8_range(model, what: str) -> float:
    """Make every Q/DQ scale ``amax / 448``; return the factor applied.

    ModelOpt's ONNX FP8 path calibrates INT8 scales (``amax / 127``) and converts them as
    ``s * 448 / 127``, which is ``amax / 36``: FP8 codes then span +-36 of E4M3's +-448 and the
    subnormal floor sits 12x higher (its issue #215, kept as intended upstream).  The factor is
    measured on the weights, whose amax is known here, and must agree across all of them; a
    ModelOpt that already gives ``amax / 448`` gets factor 1.
    """
    from onnx import numpy_helper

    tensors = {t.name: t for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    missing = sorted({n.input[1] for n in qdq if n.input[1] not in tensors})
    if missing:
        raise EngineError(f"{what}: Q/DQ scales {missing[:3]} are not initializers")
    ratios = []
    for n in qdq:
        if n.op_type != "QuantizeLinear" or n.input[0] not in tensors:
            continue
        w = np.abs(numpy_helper.to_array(tensors[n.input[0]]).astype(np.float32))
        scale = numpy_helper.to_array(tensors[n.input[1]]).astype(np.float32)
        if scale.ndim:  # per channel along ``axis``
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1) % w.ndim
            w = w.max(axis=tuple(i for i in range(w.ndim) if i != axis))
        else:
            w = w.max()
        used = w > 0
        ratios.append((w[used] / 448 / scale[used]).ravel())
    if not ratios:
        raise EngineError(f"{what}: no quantized weight to measure the FP8 scale convention on")
    ratios = np.concatenate(ratios)
    factor = float(np.median(ratios))
    if not np.allclose(ratios, factor, rtol=1e-2):
        raise EngineError(f"{what}: ModelOpt's weight scales are not one multiple of amax / 448 "
                          f"(ratios {ratios.min():.4g}..{ratios.max():.4g}); cannot normalize them")
    if abs(factor - 1) > 1e-3:
        for name in sorted({n.input[1] for n in qdq}):
            t = tensors[name]
            value = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array((value.astype(np.float32) * factor).astype(value.dtype), name))
    return factor


def quantize_e4m3(w: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear to FLOAT8E4M3FN (saturate=1): ``w / scale`` in float32, clipped to +-448, rounded
    to the nearest even E4M3 value."""
    import ml_dtypes

    s = scale.astype(np.float32)
    if s.ndim:  # per channel along ``axis``
        shape = [1] * w.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    return np.clip(w.astype(np.float32) / s, -448, 448).astype(ml_dtypes.float8_e4m3fn)


def store_fp8_weights(model) -> int:
    """Replace every QuantizeLinear of a constant weight by the E4M3 tensor it computes, so the graph stores
    its quantized weights (half the bytes of fp16) and DequantizeLinear reads them directly; return how many.
    TensorRT and ONNX Runtime compute the same tensor from the Q/DQ pair, so the graph means the same."""
    from onnx import TensorProto, numpy_helper

    tensors = {t.name: t for t in model.graph.initializer}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    done, keep = 0, []
    for node in model.graph.node:
        weight = tensors.get(node.input[0]) if node.op_type == "QuantizeLinear" else None
        zero = tensors.get(node.input[2]) if weight is not None and len(node.input) > 2 else None
        if weight is None or zero is None or zero.data_type != TensorProto.FLOAT8E4M3FN:
            keep.append(node)
            continue
        w = numpy_helper.to_array(weight)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % w.ndim
        q = quantize_e4m3(w, numpy_helper.to_array(tensors[node.input[1]]), axis)
        fp8 = TensorProto(name=node.output[0], data_type=TensorProto.FLOAT8E4M3FN, dims=w.shape,
                          raw_data=q.tobytes())
        model.graph.initializer.append(fp8)
        users[weight.name] -= 1
        done += 1
    del model.graph.node[:]
    model.graph.node.extend(keep)
    unused = [t for t in model.graph.initializer
              if users.get(t.name, 1) == 0 and t.data_type != TensorProto.FLOAT8E4M3FN]
    for t in unused:
        model.graph.initializer.remove(t)
    return done


def check_same_io(source, model, what: str) -> None:
    def io(m):
        return [(v.name, v.type.tensor_type.elem_type) for v in list(m.graph.input) + list(m.graph.output)]

    if io(model) != io(source):
        raise EngineError(f"{what}: the quantized graph's inputs/outputs {io(model)} differ from the source's "
                          f"{io(source)}")


def tensor_bytes(tensor) -> int:
    """Bytes of an initializer's data, wherever it is stored."""
    from onnx import TensorProto

    if tensor.data_location == TensorProto.EXTERNAL:
        return int({e.key: e.value for e in tensor.external_data}.get("length", 0))
    return tensor.ByteSize()


def initializer_bytes(model) -> int:
    return sum(tensor_bytes(t) for t in model.graph.initializer)


EXTERNAL_THRESHOLD = 1024  # initializers of fewer bytes stay inside the graph file
ALIGN_THRESHOLD, ALIGNMENT = 2**20, 2**16  # tensors of 1 MiB or more start on 64 KiB boundaries (mappable), as onnx's
COPY_CHUNK = 64 * 2**20


def save_with_external_data(model, path: Path, data_name: str, source_folder: Path | None) -> None:
    """``model`` to ``path`` with every initializer of ``EXTERNAL_THRESHOLD`` bytes or more in ``data_name`` beside it:
    in-memory ones written from their bytes, external ones (still in a source graph's data file under
    ``source_folder``) copied from there range by range, without loading the source whole."""
    import onnx
    from onnx import TensorProto

    def external(tensor, offset: int, length: int) -> None:
        del tensor.external_data[:]
        for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = TensorProto.EXTERNAL

    sources: dict[str, object] = {}
    with open(path.parent / data_name, "wb") as out:
        try:
            for t in model.graph.initializer:
                if tensor_bytes(t) >= ALIGN_THRESHOLD and out.tell() % ALIGNMENT:
                    out.write(b"\0" * (ALIGNMENT - out.tell() % ALIGNMENT))
                offset = out.tell()
                if t.data_location == TensorProto.EXTERNAL:
                    info = {e.key: e.value for e in t.external_data}
                    if source_folder is None:
                        raise EngineError(f"initializer {t.name!r} is stored in {info.get('location')!r} and no "
                                          f"source folder was given to copy it from")
                    where = str(Path(source_folder) / info["location"])
                    src = sources.get(where) or sources.setdefault(where, open(where, "rb"))
                    src.seek(int(info.get("offset", 0)))
                    left = int(info["length"])
                    while left:
                        chunk = src.read(min(left, COPY_CHUNK))
                        if not chunk:
                            raise EngineError(f"initializer {t.name!r}: {where} ends before its {info['length']} bytes")
                        out.write(chunk)
                        left -= len(chunk)
                    external(t, offset, int(info["length"]))
                elif t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_THRESHOLD:
                    out.write(t.raw_data)
                    external(t, offset, len(t.raw_data))
                    t.ClearField("raw_data")
        finally:
            for f in sources.values():
                f.close()
    onnx.save_model(model, str(path))


def write_graph(model, out_onnx: Path, staging: Path, source_folder: Path | None = None) -> str | None:
    """Save into ``staging`` under the final names, then move the data file and last the graph;
    return the data file's name, if any. Initializers still stored externally are copied from
    their data files under ``source_folder``."""
    import onnx
    from onnx import TensorProto

    external = initializer_bytes(model) > EXTERNAL_DATA_BYTES or any(
        t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    data_name = f"{out_onnx.name}.data" if external else None
    final = staging / "final"
    final.mkdir()
    if external:
        save_with_external_data(model, final / out_onnx.name, data_name, source_folder)
        os.replace(final / data_name, out_onnx.parent / data_name)
    else:
        onnx.save_model(model, str(final / out_onnx.name))
    os.replace(final / out_onnx.name, out_onnx)
    return data_name


def log(msg: str) -> None:
    print(f"[fluxrt fp8] {msg}", file=sys.stderr, flush=True)


def record_path(out_onnx: Path) -> Path:
    """``transformer.fp8.onnx`` -> ``transformer.fp8.json``: the graph's provenance record."""
    return Path(out_onnx).with_suffix(".json")


def reusable_calibration(graph: Path, source_fingerprint: str, calibration: dict) -> dict | None:
    """The record of an FP8 graph written by :func:`calibrate_fp8` that can be used again, or None: the graph
    and its record must exist, the record name this source graph and these settings (``asdict`` of an
    Fp8Settings), and the graph's files be the ones it records (a graph copied over it is not)."""
    from fluxrt.artifacts import graph_fingerprint

    graph, record_file = Path(graph), record_path(graph)
    if not graph.is_file() or not record_file.is_file():
        return None
    try:
        record = json.loads(record_file.read_text())
        if record["source"]["fingerprint"] != source_fingerprint or record["calibration"] != calibration:
            return None
        if graph_fingerprint(graph)["sha256"] != record["fingerprint"]["sha256"]:
            log(f"{graph} does not match its record {record_file.name} (replaced?); calibrating again")
            return None
    except (OSError, ValueError, KeyError, TypeError, ExportError):  # unreadable, or a data file is missing
        return None
    return record


def calibrate_fp8(export_dir: str | Path, out_onnx: str | Path, *, component: str = "transformer",
                  prompts: Sequence[str] | None = None, settings: Fp8Settings = Fp8Settings()) -> dict:
    """Calibrate ``component`` of an export folder on ``prompts`` (default: the bundled ones) and
    write its FP8 Q/DQ graph to ``out_onnx``; return the record also written to ``record_path(out_onnx)``."""
    import onnx
    import onnxruntime

    start = time.perf_counter()
    check_component(component)
    if not isinstance(settings, Fp8Settings):
        raise ValueError(f"settings must be an Fp8Settings, got {type(settings).__name__}")
    export_dir, out_onnx = Path(export_dir), Path(out_onnx)
    folder = open_export(export_dir, component)
    # read for its linears only; the sampling loop below verifies every graph it runs (this one too)
    # before anything is written
    source, record = folder.graph_path(component), folder.record(component)
    source_files = sorted(record["fingerprint"]["files"])
    external = len(source_files) > 1
    what = f"FP8 calibration of {component}: {source}"
    if not out_onnx.parent.is_dir():
        raise EngineError(f"{what}: output folder {out_onnx.parent} does not exist")
    if out_onnx.resolve() == source.resolve():
        raise EngineError(f"{what}: the output {out_onnx} is the source graph itself; write it elsewhere")
    resolved = settings.resolve(folder.variant)
    chosen = pick_prompts(prompts, settings.num_prompts)
    kernels = record.get("attention") == "ort-kernels"  # fluxrt's ops: its own calibration, not ModelOpt's
    library = dict(name="fluxrt", method="max, fluxrt.engines.fp8_ort") if kernels else None
    if not kernels:
        modelopt_version, quantize = import_modelopt()
        library = dict(name="nvidia-modelopt", version=modelopt_version)
    try:
        source_model = onnx.load(str(source), load_external_data=False)
    except Exception as e:  # a damaged file: its fingerprint says how, else the parser's message
        try:
            folder.verified_graph(component)
        except ExportError as mismatch:
            raise EngineError(f"FP8 calibration of {component}: {mismatch}") from None
        raise EngineError(f"{what}: not a readable ONNX graph ({type(e).__name__}: {e})") from None
    linears = find_linears(source_model, what)
    selected, excluded = select_linears(linears, component, what)

    loop = (f"{resolved['num_inference_steps']} steps at {resolved['height']}x{resolved['width']}"
            if component == "transformer" else f"{resolved['max_sequence_length']} tokens")
    log(f"{component}: sampling {len(chosen)} prompts ({loop}) on {settings.backend}")
    try:
        feeds = capture_feeds(export_dir, chosen, settings, component)
    except ExportError as e:  # a graph that does not match the manifest, refused before it ran
        raise EngineError(f"FP8 calibration of {component}: {e}") from None
    captured = time.perf_counter()
    log(f"{component}: {len(feeds)} samples in {captured - start:.1f}s; quantizing {len(selected)} linears")

    staging = out_onnx.parent / f".staging-{out_onnx.stem}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if kernels:
            from fluxrt.engines import fp8_ort

            model, done, missed = quantize_kernels(source, feeds, selected, settings.backend, what,
                                                   settings.fp8_attention, settings.fused_products,
                                                   settings.fast_accumulation)
            factor, stored = 1.0, len(done)
            products, fused = fp8_ort.count_fp8_linears(model), fp8_ort.fused_products(model)
        else:
            staged = stage_source(source, source_files, staging)
            quantized_path = staging / "quantized.onnx"
            run_modelopt(quantize, staged, quantized_path, feeds, selected, settings.backend, external=external)
            model = onnx.load(str(quantized_path))
            done, missed = quantized_linears(model, selected)
            if not done:
                raise EngineError(f"{what}: ModelOpt quantized none of the {len(selected)} selected linears")
            factor = rescale_to_fp8_range(model, what)
            stored = store_fp8_weights(model)
        check_same_io(source_model, model, what)
        for node in model.graph.node:  # every linear, quantized or not, by its module path
            node.name = linears.get(node.name, node.name)
        data_file = write_graph(model, out_onnx, staging, source.parent if kernels else None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    quantized_at = time.perf_counter()

    excluded.update({path: "left out by ModelOpt (GEMV or unsupported pattern)" for path in missed})
    out = dict(
        component=component, file=str(out_onnx), data_file=data_file,
        fingerprint=graph_fingerprint(out_onnx),
        source=dict(export_dir=str(export_dir), file=source.name, fingerprint=record["fingerprint"]["sha256"],
                    precision=record.get("precision"), variant=folder.variant,
                    checkpoint=folder.manifest.get("source", {}).get("fingerprint")),
        quantization=dict(mode="fp8", dtype="FLOAT8E4M3FN",
                          activations="per tensor, scale = max |x| over all samples / 448",
                          weights="per output channel, scale = max |w| / 448",
                          graph="fluxrt FP8 ops (Fp8Linear on cuBLASLt)" if kernels else "QuantizeLinear/DequantizeLinear",
                          **(dict(matrix_products=products, fused_products=fused,
                                  accumulation=("FP8 fast accumulation (cuBLASLt CUBLASLT_MATMUL_DESC_FAST_ACCUM)"
                                                if settings.fast_accumulation else "float32")) if kernels else {}),
                          attention=("FP8 (Fp8Attention: cuDNN's FP8 attention; q, k, v, output per tensor, "
                                     "probabilities as p * 448)") if settings.fp8_attention else "source precision",
                          modelopt_scale_factor=factor,  # applied to ModelOpt's scales; see rescale_to_fp8_range
                          stored_fp8_weights=stored),
        calibration=asdict(settings), settings=resolved, prompts=chosen,
        prompts_sha256=hashlib.sha256("\n".join(chosen).encode()).hexdigest(),
        num_samples=len(feeds), quantized=sorted(done), excluded=dict(sorted(excluded.items())),
        library=library,
        versions=dict(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__, numpy=np.__version__),
        seconds=dict(capture=round(captured - start, 2), quantize=round(quantized_at - captured, 2),
                     total=round(time.perf_counter() - start, 2)),
    )
    atomic_write_json(record_path(out_onnx), out)  # last: a graph without its record is never trusted
    log(f"{component}: {len(done)} linears in FP8, {len(excluded)} kept; wrote {out_onnx} "
        f"in {out['seconds']['total']:.1f}s")
    return out


__all__ = ["Fp8Settings", "RULES", "RecordingRunner", "bundled_prompts", "calibrate_fp8", "capture_feeds"]
