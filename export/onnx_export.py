"""Export a FLUX.1 checkpoint's networks to ONNX, into a self-contained export folder.

Folder layout (everything later stages need, nothing else; the format is ``fluxrt.artifacts``):
    manifest.json                 variant, precision, dims, per-graph records, source fingerprint
    clip.onnx t5.onnx transformer.onnx vae_decoder.onnx vae_encoder.onnx   (+ NAME.onnx.data over 2 GB)
    tokenizer/tokenizer.json      CLIP tokenizer (tokenizers JSON, converted by transformers)
    tokenizer_2/tokenizer.json    T5 tokenizer
    scheduler/scheduler_config.json
    vae/config.json               scaling_factor, shift_factor, ...

Every file is written under a temporary name and renamed; the manifest is rewritten last,
so an interrupted export leaves the folder as it was plus complete graphs.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from fluxrt.artifacts import (
    EXPORT_FORMAT, EXPORT_MANIFEST, EXTERNAL_DATA_BYTES, graph_fingerprint, write_export_manifest,
)
from fluxrt.components import (
    ATTENTION_MODES, COMPONENTS, PRECISIONS, ComponentSpec, ModelDims, component_precision, component_spec,
)
from fluxrt.dtypes import numpy_dtype
from fluxrt.errors import ExportError
from fluxrt.export import graphs
from fluxrt.export.checkpoint import Checkpoint
from fluxrt.export.lora import lora_records, merge_loras, read_loras
from fluxrt.export.memory import PeakMemory
from fluxrt.export.ort_fusions import fuse_graph
from fluxrt.export.weights import TORCH_DTYPES
from fluxrt.files import atomic_write_text, locked, read_json, separate_folders
from fluxrt.lora import LoraFile

OPSET = 20
OPSET_BF16 = 22  # Conv, InstanceNormalization and others accept bfloat16 only from opset 22
# example sizes for tracing: none is 1 (torch.export would specialise it) and no two are equal
EXAMPLE = dict(B=2, S=7, h=6, w=10)
USER_COMPONENTS = ("clip", "t5", "transformer", "vae")  # "vae" exports vae_decoder and vae_encoder


@dataclass(frozen=True)
class ExportRequest:
    components: tuple[str, ...]
    precision: str
    attention: str = "portable"  # see fluxrt.components.ATTENTION_MODES
    external_data_bytes: int = EXTERNAL_DATA_BYTES  # graphs with more weights keep them in NAME.onnx.data
    loras: tuple[tuple[str, float], ...] = ()  # (LoRA file, scale) merged into the transformer, in this order

    def __post_init__(self) -> None:
        for pair in self.loras:
            scale = pair[1] if isinstance(pair, tuple) and len(pair) == 2 else None
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
                raise ValueError(f"ExportRequest.loras holds {pair!r}; each must be (file, finite scale)")
        if self.loras and "transformer" not in self.components:
            raise ValueError(f"ExportRequest.loras merge into the transformer, which ExportRequest.components "
                             f"{list(self.components)} leaves out")
        if isinstance(self.external_data_bytes, bool) or not isinstance(self.external_data_bytes, int) \
                or self.external_data_bytes < 0:
            raise ValueError(f"ExportRequest.external_data_bytes must be a non-negative integer, got {self.external_data_bytes!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"ExportRequest.attention {self.attention!r} is not one of {ATTENTION_MODES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"ExportRequest.precision {self.precision!r} is not one of {PRECISIONS}")
        unknown = [c for c in self.components if c not in USER_COMPONENTS]
        if unknown or not self.components:
            raise ValueError(f"ExportRequest.components {list(self.components)}: each must be one of {list(USER_COMPONENTS)}")

    @property
    def graphs(self) -> list[str]:
        out = []
        for c in self.components:
            out += ["vae_decoder", "vae_encoder"] if c == "vae" else [c]
        return [c for c in COMPONENTS if c in out]


def log(msg: str) -> None:
    print(f"[fluxrt export] {msg}", file=sys.stderr, flush=True)


def quiet_exporter() -> None:
    """The exporter's notes about torchvision ops and merged axis names are noise for FLUX graphs."""
    import logging
    import warnings

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")


def example_inputs(spec: ComponentSpec, dims: ModelDims, precision: str) -> tuple[torch.Tensor, ...]:
    sizes = dict(EXAMPLE, N=(EXAMPLE["h"] // 2) * (EXAMPLE["w"] // 2),
                 H=EXAMPLE["h"] * dims.vae_scale_factor, W=EXAMPLE["w"] * dims.vae_scale_factor)
    g = torch.Generator().manual_seed(0)
    out = []
    for t in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
        if t.dtype == "int32":
            out.append(torch.randint(0, 10, shape, generator=g, dtype=torch.int32))
        else:
            dtype = TORCH_DTYPES[precision] if t.dtype == "act" else torch.float32
            out.append(torch.rand(shape, generator=g).to(dtype))
    return tuple(out)


def dynamic_shapes(spec: ComponentSpec, dims: ModelDims) -> dict:
    from torch.export import Dim

    bounds = {"S": (1, dims.t5_max_length)}
    axes: dict[str, object] = {}
    f = dims.vae_scale_factor
    for t in spec.inputs:
        for d in t.shape:
            if isinstance(d, str) and d not in axes and d not in ("H", "W"):
                lo, hi = bounds.get(d, (1, 2**16))
                axes[d] = Dim(d, min=lo, max=hi)
    if any("H" in t.shape for t in spec.inputs):  # the encoder takes pixels: multiples of the VAE factor
        axes["H"] = f * Dim("h", min=1, max=2**12)
        axes["W"] = f * Dim("w", min=1, max=2**12)
    return {t.name: {i: axes[d] for i, d in t.dynamic_axes().items()} for t in spec.inputs}


def load_graph_module(name: str, ckpt: Checkpoint, precision: str, attention: str = "portable",
                      loras: Sequence[tuple[LoraFile, float]] = ()) -> torch.nn.Module:
    """``loras``: (file, scale) pairs merged into the transformer's weights before the attention rewrite."""
    dtype = TORCH_DTYPES[precision]
    if name == "clip":
        return graphs.ClipGraph(ckpt.load_clip(dtype))
    if name == "t5":
        model = ckpt.load_t5(torch.float32 if dtype == torch.float16 else dtype)
        if dtype == torch.float16:
            # T5 v1.1 overflows fp16 in its feed-forward output projections: keep those in fp32, as
            # transformers' T5 does (_keep_in_fp32_modules = ["wo"]); the rest runs in fp16.
            model.half()
            for m in model.modules():
                if hasattr(m, "wo"):
                    m.wo.float()
        return graphs.T5Graph(model)
    if name == "transformer":
        model = ckpt.load_transformer(dtype)
        merge_loras(model, loras)
        return graphs.TransformerGraph(model, guidance=ckpt.dims().guidance, rewrite=attention)
    vae = ckpt.load_vae(dtype)
    return graphs.VaeDecoderGraph(vae) if name == "vae_decoder" else graphs.VaeEncoderGraph(vae)


def opset_for(precision: str) -> int:
    return OPSET_BF16 if precision == "bf16" else OPSET


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_graph(name: str, ckpt: Checkpoint, precision: str, out_dir: Path, attention: str = "portable",
                 external_data_bytes: int = EXTERNAL_DATA_BYTES, loras: Sequence[tuple[LoraFile, float]] = ()) -> dict:
    """Trace one component (the transformer with ``loras`` merged) and write ``out_dir/NAME.onnx`` (+ ``.data``)
    atomically; return its record."""
    dims = ckpt.dims()
    spec = component_spec(name, dims)
    graph_precision = component_precision(name, precision)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        log(f"{name}: loading weights ({graph_precision})")
        module = load_graph_module(name, ckpt, graph_precision, attention, loras).eval()
        nbytes = param_bytes(module)
        log(f"{name}: {nbytes / 2**20:.1f} MiB of weights loaded in {time.perf_counter() - t0:.1f}s; tracing")
        t1 = time.perf_counter()
        quiet_exporter()
        device = next(module.parameters()).device  # a checkpoint may hand its modules over on a GPU
        with torch.no_grad():
            program = torch.onnx.export(
                module, tuple(x.to(device) for x in example_inputs(spec, dims, graph_precision)), dynamo=True, opset_version=opset_for(graph_precision),
                input_names=spec.input_names, output_names=spec.output_names,
                dynamic_shapes=dynamic_shapes(spec, dims), verbose=False,
                custom_translation_table=graphs.translation_table(attention) if name == "transformer" else None,
            )
            fusions = fuse_graph(program.model) if name == "transformer" and attention == "ort" else None
            if name == "transformer" and attention == "ort-kernels":
                from fluxrt.export.ort_kernels import tag_value_biases

                tag_value_biases(program.model, module)
        log(f"{name}: traced in {time.perf_counter() - t1:.1f}s; writing")
        external = nbytes > external_data_bytes
        path = out_dir / f"{name}.onnx"
        write_program(program, path, external)
        del program, module
    opset = check_graph(path, spec, graph_precision)
    record = dict(
        file=path.name, precision=graph_precision, opset=opset, fingerprint=graph_fingerprint(path),
        weights_bytes=nbytes, export_seconds=round(time.perf_counter() - t0, 2),
        peak_rss_bytes=mem.peak_bytes, inputs=spec.input_names, outputs=spec.output_names,
        attention=attention if name == "transformer" else "portable",
    )
    if fusions is not None:
        record["graph_fusions"] = fusions
    if loras:
        record["loras"] = lora_records(loras)
    log(f"{name}: done in {record['export_seconds']}s, peak host memory {mem.peak_bytes / 2**30:.2f} GiB")
    return record


RANGE_CONSTRAINTS = "pkg.torch.export.ExportedProgram.range_constraints"


def reproducible(model) -> None:
    """Make the exporter's graph metadata independent of the process: torch writes the symbolic shapes' range
    constraints in set order, which changes with Python's hash seed, so the same checkpoint gave graphs that
    differed byte-wise. The constraints are kept, sorted."""
    meta = model.graph.metadata_props
    text = meta.get(RANGE_CONSTRAINTS)
    if text is not None:
        entries = re.findall(r"[^{},]+?: VR\[[^\]]*\]", text)
        meta[RANGE_CONSTRAINTS] = "{" + ", ".join(sorted(e.strip() for e in entries)) + "}"


STAGING_PREFIX = ".staging-"


def remove_stale_staging(out_dir: Path) -> None:
    """Staging folders of exports that were killed: with the folder's export lock held, no other export is
    writing one, so every staging folder there is a dead one's."""
    for stale in out_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def contiguous_initializers(model) -> int:
    """The exporter's constant folding leaves some initializers as strided NumPy views (the transposed weight of
    every linear, with fluxrt's ort-kernels rewrite: most of the model), and NumPy writes a strided array to a file
    element by element: about 100 MB/s, four minutes for the FLUX transformer. Each such initializer is made a
    lazy tensor that hands the writer a contiguous copy, one tensor at a time (no second copy of the model in
    memory). Returns how many were wrapped."""
    import numpy as np
    import onnx_ir as ir

    count = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        raw = getattr(tensor, "raw", None)
        if not isinstance(raw, np.ndarray) or raw.flags.c_contiguous:
            continue
        if hasattr(ir, "LazyTensor"):
            value.const_value = ir.LazyTensor(
                lambda raw=raw, dtype=tensor.dtype: ir.Tensor(np.ascontiguousarray(raw), dtype=dtype),
                dtype=tensor.dtype, shape=tensor.shape, name=tensor.name, doc_string=tensor.doc_string,
                metadata_props=dict(tensor.metadata_props))
        else:  # onnx-ir before LazyTensor: the copy now (memory for it, but still the fast write)
            value.const_value = ir.Tensor(np.ascontiguousarray(raw), dtype=tensor.dtype, name=tensor.name,
                                          doc_string=tensor.doc_string, metadata_props=dict(tensor.metadata_props))
        count += 1
    return count


def write_program(program, path: Path, external: bool) -> None:
    """Save to a staging folder beside ``path``, then move the data file and finally the graph."""
    reproducible(program.model)
    contiguous_initializers(program.model)
    staging = path.parent / f"{STAGING_PREFIX}{path.stem}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        program.save(str(staging / path.name), external_data=external)
        if external:
            os.replace(staging / f"{path.name}.data", path.parent / f"{path.name}.data")
        os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_graph(path: Path, spec: ComponentSpec, precision: str) -> int:
    """The written graph has the spec's names and dtypes, and no float64 (TensorRT has none);
    returns its opset (of the default domain)."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path), load_external_data=False)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != spec.input_names or got_out != spec.output_names:
        raise ExportError(f"{path}: inputs {got_in} / outputs {got_out}, expected {spec.input_names} / "
                          f"{spec.output_names}")
    for value, t in zip(list(model.graph.input) + list(model.graph.output), spec.inputs + spec.outputs):
        want = onnx.helper.np_dtype_to_tensor_dtype(numpy_dtype(t.resolved_dtype(precision)))
        if value.type.tensor_type.elem_type != want:
            raise ExportError(f"{path}: tensor {t.name!r} has ONNX dtype {value.type.tensor_type.elem_type}, "
                              f"expected {want} ({t.resolved_dtype(precision)})")
    doubles = [n.name for n in model.graph.node
               if n.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.DOUBLE for a in n.attribute)]
    doubles += [i.name for i in model.graph.initializer if i.data_type == TensorProto.DOUBLE]
    if doubles:
        raise ExportError(f"{path}: float64 tensors {doubles[:5]} would not build in TensorRT")
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def copy_side_files(ckpt: Checkpoint, out_dir: Path) -> None:
    """Tokenizers (as tokenizers JSON), scheduler config and VAE config."""
    from fluxrt.export.tokenizers_tiny import write_runtime_tokenizer

    for sub, kind in (("tokenizer", "clip"), ("tokenizer_2", "t5")):
        (out_dir / sub).mkdir(exist_ok=True)
        write_runtime_tokenizer(ckpt.root / sub, out_dir / sub / "tokenizer.json", kind)
    for sub, config in (("scheduler", ckpt.config("scheduler")), ("vae", ckpt.vae_config())):
        (out_dir / sub).mkdir(exist_ok=True)
        name = "scheduler_config.json" if sub == "scheduler" else "config.json"
        clean = {k: v for k, v in config.items() if not k.startswith("_")} if sub == "vae" else config
        atomic_write_text(out_dir / sub / name, json.dumps(clean, indent=2, default=list))


def read_manifest(out_dir: Path) -> dict | None:
    path = out_dir / EXPORT_MANIFEST
    if not path.exists():
        return None
    data = read_json(path, "export manifest", ExportError)
    if data.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: format {data.get('format')!r}, expected {EXPORT_FORMAT!r} (another fluxrt "
                          f"version's export: use another folder)")
    return data


def library_versions() -> dict:
    import diffusers
    import onnx
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__, "python": sys.version.split()[0]}


def export_checkpoint(ckpt: Checkpoint, out_dir: str | Path, request: ExportRequest) -> dict:
    """Export the requested components; a folder already holding another checkpoint's or
    precision's graphs is refused rather than mixed, and so is the checkpoint's own folder (or one around or
    inside it).  One export at a time writes into a folder (a lock beside the manifest)."""
    out_dir = Path(out_dir)
    separate_folders(ckpt.root, out_dir, "the checkpoint folder", "--out", ExportError)
    for extra in (ckpt.transformer_file, ckpt.vae_file):
        if extra is not None and Path(extra).resolve().is_relative_to(out_dir.resolve()):
            raise ExportError(f"--out {out_dir} contains the checkpoint file {extra}: name a folder of its own")
    ckpt.check_weights(request.components)  # before anything is written
    loras = read_loras(request.loras, ckpt.transformer_config())
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with locked(out_dir / ".export.lock"):
            return export_locked(ckpt, out_dir, request, loras)
    except BaseException:
        if created and not (out_dir / EXPORT_MANIFEST).exists():  # nothing of it to keep
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def export_locked(ckpt: Checkpoint, out_dir: Path, request: ExportRequest,
                  loras: Sequence[tuple[LoraFile, float]] = ()) -> dict:
    dims = ckpt.dims()
    fingerprint = ckpt.fingerprint()
    manifest = read_manifest(out_dir) or {}
    if manifest and (manifest["source"]["fingerprint"] != fingerprint or manifest["precision"] != request.precision):
        raise ExportError(
            f"{out_dir} already holds a {manifest['precision']} export of {manifest['source']['path']} "
            f"(fingerprint {manifest['source']['fingerprint'][:12]}); asked for {request.precision} from "
            f"{ckpt.root} ({fingerprint[:12]}): use another folder"
        )
    remove_stale_staging(out_dir)
    copy_side_files(ckpt, out_dir)
    records = dict(manifest.get("components", {}))
    for name in request.graphs:
        records[name] = export_graph(name, ckpt, request.precision, out_dir, request.attention,
                                     request.external_data_bytes, loras if name == "transformer" else ())
        manifest = dict(
            variant=dims.variant, precision=request.precision, dims=dims.to_json(),
            source=dict(path=str(ckpt.root.resolve()), fingerprint=fingerprint,
                        transformer_file=str(ckpt.transformer_file) if ckpt.transformer_file else None,
                        vae_file=str(ckpt.vae_file) if ckpt.vae_file else None),
            units=dict(timestep="sigma in [0, 1], float32", guidance="guidance scale, float32",
                       vae_decoder_latent="latent / scaling_factor + shift_factor"),
            shapes=dict(batch="dynamic", text_length=f"1..{dims.t5_max_length} (T5), {dims.clip_max_length} (CLIP)",
                        image=f"multiples of {2 * dims.vae_scale_factor} px"),
            transformer_config={k: v for k, v in ckpt.transformer_config().items() if not k.startswith("_")},
            versions=library_versions(), components=records,
        )
        write_export_manifest(out_dir, manifest)
    return read_manifest(out_dir)
