"""Full-size FLUX.1-dev latency on one GPU with seeded random weights (latency does not depend
on weight values): torch eager, torch.compile and fluxrt's ONNX Runtime CUDA path, side by side
in one process, on the same inputs.

The transformer is measured on full-width slices of two depths with the real 1:2 ratio of double
to single blocks (``d`` double + ``2d`` single); both slices contain the embedders and the final
projection.  Per-step time is linear in the number of (1 double + 2 single) units u:
t(u) = a + b*u, so two slices give a and b and the full model (u = 19) is a + 19*b.  T5-XXL is
measured at two depths the same way (24 layers in the full model); CLIP-L and the VAE decoder whole.

torch eager and torch.compile run diffusers' and transformers' modules as they are (bf16). fluxrt's
path is its ONNX export (the transformer fused for ONNX Runtime unless ``--attention portable``;
``--attention ort-kernels,ort`` times the graph with fluxrt's own kernels beside the stock-op one)
run by the runtime's ``OrtRunner`` on CUDA: inputs and outputs bound on the device, a CUDA graph
where capture succeeds, the runtime's session settings (``--ort-variants`` times others beside
them). ``--profile N`` adds N calls under CUPTI per measurement: kernel time by kernel and kind.

Every measurement is appended to ``OUT/results.json`` as soon as it is taken, so a run that hits
its time limit still reports what it measured.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fluxrt.bench import pipelines as bench
from fluxrt.components import (ATTENTION_MODES, VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR, ModelDims, component_precision,
                               component_spec)
from fluxrt.errors import InvalidInputError
from fluxrt.export import graphs
from fluxrt.export.memory import PeakMemory
from fluxrt.export.onnx_export import dynamic_shapes, example_inputs, opset_for, quiet_exporter, write_program
from fluxrt.export.ort_fusions import fuse_graph
from fluxrt.export.weights import TORCH_DTYPES
from fluxrt.files import atomic_write_json
from fluxrt.runtime.ort import ORT_CUDA_DISABLED_OPTIMIZERS

FLUX_DEV = {
    "transformer": dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                        in_channels=64, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                        axes_dims_rope=(16, 56, 56)),
    "t5": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
               is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False),
    "clip": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                 eos_token_id=49407),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
                scaling_factor=VAE_SCALING_FACTOR, shift_factor=VAE_SHIFT_FACTOR),
}


def tiny_configs() -> dict:
    """The built-in tiny model's architecture: for smoke-testing this benchmark on a CPU."""
    from fluxrt.export.tiny import TINY_TRANSFORMER, TINY_VAE, TINY_WIDTH

    return {
        "transformer": dict(TINY_TRANSFORMER, guidance_embeds=True),
        "t5": dict(FLUX_DEV["t5"], vocab_size=1000, d_model=TINY_WIDTH, d_kv=8, d_ff=64, num_heads=4),
        "clip": dict(FLUX_DEV["clip"], vocab_size=1000, hidden_size=TINY_WIDTH, intermediate_size=64,
                     num_attention_heads=2, projection_dim=TINY_WIDTH, eos_token_id=999),
        "vae": {k: v for k, v in TINY_VAE.items() if k != "sample_size"},
    }


CONFIG = dict(FLUX_DEV)
DIMS = ModelDims(variant="dev")


def use_model(name: str) -> None:
    """Select the architecture every function here builds ("flux-dev" or "tiny")."""
    global DIMS
    configs = tiny_configs() if name == "tiny" else FLUX_DEV
    CONFIG.clear()
    CONFIG.update(configs)
    t = configs["transformer"]
    DIMS = ModelDims(variant="dev", clip_hidden_size=configs["clip"]["hidden_size"],
                     t5_d_model=configs["t5"]["d_model"], joint_attention_dim=t["joint_attention_dim"],
                     pooled_projection_dim=t["pooled_projection_dim"])


@dataclass(frozen=True)
class Shape:
    batch: int = 1
    height: int = 1024
    width: int = 1024
    text: int = 512

    @property
    def image_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)


def log(msg: str) -> None:
    print(f"[fluxrt bench] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or "scale" in name):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return module.eval().requires_grad_(False)


def build(component: str, dtype: torch.dtype, device: str, layers: tuple[int, ...] | None = None, seed: int = 0):
    """A full-width module with seeded random weights, built straight on ``device``."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    config = dict(CONFIG[component])
    if component == "transformer" and layers:
        config.update(num_layers=layers[0], num_single_layers=layers[1])
    if component == "t5" and layers:
        config.update(num_layers=layers[0])
    factory = {
        "transformer": lambda: FluxTransformer2DModel(**config),
        "t5": lambda: T5EncoderModel(T5Config(**config)),
        "clip": lambda: CLIPTextModel(CLIPTextConfig(**config)),
        "vae": lambda: AutoencoderKL(**config),
    }[component]
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device=device).to(dtype)
    if component == "clip":  # position ids are a buffer, uninitialised by to_empty: rebuild it
        for sub in module.modules():
            if "position_ids" in dict(sub.named_buffers(recurse=False)):
                sub.register_buffer("position_ids", torch.arange(77, device=device).unsqueeze(0), persistent=False)
    if component == "t5" and dtype == torch.float16:
        for m in module.modules():
            if hasattr(m, "wo"):
                m.wo.float()
    return randomize(module, seed)


def graph_module(component: str, module: torch.nn.Module, rewrite: str = "portable") -> torch.nn.Module:
    return {"transformer": lambda m: graphs.TransformerGraph(m, guidance=True, rewrite=rewrite), "t5": graphs.T5Graph,
            "clip": graphs.ClipGraph, "vae": graphs.VaeDecoderGraph}[component](module)


def inputs(component: str, shape: Shape, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(1)
    b, n, s = shape.batch, shape.image_tokens, shape.text
    joint, pooled = DIMS.joint_attention_dim, DIMS.pooled_projection_dim
    if component == "transformer":
        ids = torch.zeros(shape.height // 16, shape.width // 16, 3, device=device)
        ids[..., 1] += torch.arange(shape.height // 16, device=device)[:, None]
        ids[..., 2] += torch.arange(shape.width // 16, device=device)[None, :]
        return {"hidden_states": torch.randn(b, n, 64, generator=g, device=device).to(dtype),
                "encoder_hidden_states": torch.randn(b, s, joint, generator=g, device=device).to(dtype),
                "pooled_projections": torch.randn(b, pooled, generator=g, device=device).to(dtype),
                "timestep": torch.full((b,), 0.7, device=device), "img_ids": ids.reshape(-1, 3),
                "txt_ids": torch.zeros(s, 3, device=device), "guidance": torch.full((b,), 3.5, device=device)}
    if component == "t5":
        return {"input_ids": torch.randint(0, CONFIG["t5"]["vocab_size"] - 1, (b, s), generator=g, device=device,
                                           dtype=torch.int32)}
    if component == "clip":
        return {"input_ids": torch.randint(0, CONFIG["clip"]["vocab_size"] - 1, (b, 77), generator=g, device=device,
                                           dtype=torch.int32)}
    return {"latent": torch.randn(b, 16, shape.height // 8, shape.width // 8, generator=g, device=device).to(dtype)}


class Results:
    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.data = {"settings": settings, "machine": {}, "measurements": []}

    def add(self, **entry) -> None:
        self.data["measurements"].append(entry)
        self.data["machine"] = bench.machine_info()
        atomic_write_json(self.path, self.data)
        log(json.dumps(entry, default=str))


def sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def time_torch(fn, warmup: int, iters: int, device: str) -> dict:
    return bench.summarize(bench.time_call(fn, warmup=warmup, iters=iters, sync=sync(device)))


KERNEL_CLASSES = (  # first match wins; names as CUPTI reports them for torch, Triton and ONNX Runtime kernels
    ("fluxrt", ("fluxrt_ops::",)),  # runtime/ort_ops/fluxrt_ops.cu
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "sm80_")),
    ("triton", ("triton",)),
    ("norm", ("layernorm", "layer_norm", "rmsnorm", "rms_norm", "norm")),
    ("rotary", ("rotary",)),
    ("gelu", ("gelu",)),
    ("cast", ("cast",)),
    ("copy", ("concat", "transpose", "copy", "slice", "split", "memcpy", "memset", "cat_", "gather")),
    ("reduce", ("reduce",)),
    ("elementwise", ("elementwise", "binary", "unary", "vectorized", "add", "mul", "pow", "sqrt")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((cls for cls, keys in KERNEL_CLASSES if any(k in low for k in keys)), "other")


def kernel_profile(fn, iters: int, device: str) -> dict:
    """GPU kernel time per call of ``fn``, by kernel and by class, from CUPTI (torch.profiler sees
    every kernel of the process, ONNX Runtime's included)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        sync(device)()
    kernels = {}  # name -> (ms per call, launches per call); key_averages() lists each name once
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if us > 0:
            kernels[e.key] = (us / 1000 / iters, e.count / iters)
    classes: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        classes[kernel_class(name)] = classes.get(kernel_class(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:40]
    return {"gpu_ms": sum(ms for ms, _ in kernels.values()), "launches": sum(n for _, n in kernels.values()),
            "by_class_ms": dict(sorted(classes.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": name[:160], "ms": ms, "calls": n, "class": kernel_class(name)}
                            for name, (ms, n) in top]}


def export_onnx(component: str, module: torch.nn.Module, precision: str, path: Path, attention: str) -> dict:
    spec = component_spec("vae_decoder" if component == "vae" else component, DIMS)
    wrapped = graph_module(component, module, rewrite=attention)
    device = next(module.parameters()).device
    # tracing takes the exporter's own example sizes (no axis of size 1, no two axes equal)
    args = tuple(x.to(device) for x in example_inputs(spec, DIMS, precision))
    quiet_exporter()
    with PeakMemory() as mem, torch.no_grad():
        start = time.perf_counter()
        program = torch.onnx.export(
            wrapped, args, dynamo=True, opset_version=opset_for(precision), input_names=spec.input_names,
            output_names=spec.output_names, dynamic_shapes=dynamic_shapes(spec, DIMS), verbose=False,
            custom_translation_table=graphs.translation_table(attention) if component == "transformer" else None)
        fusions = fuse_graph(program.model) if component == "transformer" and attention == "ort" else {}
        traced = time.perf_counter() - start
        write_program(program, path, external=True)
        del program
    return {"export_seconds": time.perf_counter() - start, "trace_seconds": traced, "graph_fusions": fusions,
            "export_peak_rss_gib": mem.peak_bytes / 2**30,
            "weights_gib": sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30}


def ort_optimize(path: Path, component: str, device: str = "cuda") -> tuple[Path, dict]:
    """onnxruntime.transformers' fusions for this architecture (LayerNorm, Gelu, ...), on the graph file (for
    the CPU as its CPU kernels allow)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = {"transformer": "mmdit", "t5": "t5", "clip": "clip", "vae": "vae"}[component]
    t = CONFIG["transformer"]
    heads, hidden = {"transformer": (t["num_attention_heads"], t["num_attention_heads"] * t["attention_head_dim"]),
                     "t5": (CONFIG["t5"]["num_heads"], CONFIG["t5"]["d_model"]),
                     "clip": (CONFIG["clip"]["num_attention_heads"], CONFIG["clip"]["hidden_size"]),
                     "vae": (1, CONFIG["vae"]["block_out_channels"][-1])}[component]
    if device != "cuda" and component == "vae":
        return path, {"optimizer": "not run on the CPU: its VAE fusions (NhwcConv, GroupNorm) are CUDA-only ops"}
    options = FusionOptions(model_type)
    opt = optimize_model(str(path), model_type=model_type, num_heads=heads, hidden_size=hidden, opt_level=0,
                         use_gpu=device == "cuda", optimization_options=options)
    out = path.with_name(path.stem + ".opt.onnx")
    opt.save_model_to_file(str(out), use_external_data_format=True)
    return out, {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


def host_feed(component: str, feed: dict, precision: str) -> dict[str, np.ndarray]:
    """The bench inputs as host arrays in the graph's dtypes (bfloat16 as ml_dtypes)."""
    from fluxrt.dtypes import cast

    spec = component_spec("vae_decoder" if component == "vae" else component, DIMS)
    return {t.name: cast(feed[t.name].float().cpu().numpy() if t.dtype != "int32" else feed[t.name].cpu().numpy(),
                         t.resolved_dtype(precision)) for t in spec.inputs}


def fp8_for_timing(source: Path, feed: dict[str, np.ndarray], out: Path, device: str) -> dict:
    """``source`` (an ort-kernels transformer) on fluxrt's FP8 ops, calibrated on the one bench input: latency
    does not depend on the scale values, so one sample is enough to time it (and too few for quality)."""
    import shutil

    import onnx

    from fluxrt.engines import fp8, fp8_ort

    start = time.perf_counter()
    with PeakMemory() as mem:
        model = onnx.load(str(source), load_external_data=False)
        selected, _ = fp8.select_linears(fp8.find_linears(model, str(source)), "transformer", str(source))
        linears = fp8_ort.kernel_linears(model, selected, str(source))
        amax = fp8_ort.activation_amax(model, list(dict.fromkeys(lin.input for lin in linears)), [feed],
                                       "ort-cuda" if device == "cuda" else "ort-cpu", source.parent)
        calibrated = time.perf_counter()
        scales = fp8_ort.Scales(amax, fp8_ort.weight_amax(model, linears, source.parent))
        fp8_ort.fp8_graph(model, linears, scales, source.parent)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            fp8.write_graph(model, out, staging, source.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        del model
    return {"quantize_seconds": time.perf_counter() - start, "calibrate_seconds": calibrated - start,
            "quantize_peak_rss_gib": mem.peak_bytes / 2**30, "fp8_linears": len(linears), "calibration_samples": 1}


def time_ort(component: str, onnx_path: Path, precision: str, feed: dict, shape: Shape, warmup: int, iters: int,
             cuda_graph: bool, device: str, profile_iters: int = 0, disabled: tuple[str, ...] = (),
             attention: str = "ort", outputs: dict | None = None) -> dict:
    import onnxruntime as ort

    from fluxrt.dtypes import cast
    from fluxrt.runtime import ort_ops
    from fluxrt.runtime.ort import OrtRunner

    if device == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from the nvidia wheels torch already uses

    spec = component_spec("vae_decoder" if component == "vae" else component, DIMS)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for name, size in (("B", shape.batch), ("S", shape.text), ("N", shape.image_tokens),
                       ("h", shape.height // 8), ("w", shape.width // 8)):
        options.add_free_dimension_override_by_name(name, size)
    runner = OrtRunner(spec, precision, onnx_path, backend="ort-cuda" if device == "cuda" else "ort-cpu",
                       session_options=options, cuda_graph=cuda_graph, disabled_optimizers=disabled,
                       custom_ops=ort_ops.library_path() if attention == "ort-kernels" else None).activate()
    xp = np
    if device == "cuda":
        import cupy as xp
    device_feed = {}
    for t in spec.inputs:
        x = xp.asarray(feed[t.name].float().cpu().numpy() if t.dtype != "int32" else feed[t.name].cpu().numpy())
        device_feed[t.name] = cast(x, t.resolved_dtype(precision))
    stats = bench.summarize(bench.time_call(lambda: runner.infer(device_feed), warmup=warmup, iters=iters))
    if profile_iters and device == "cuda":
        stats["kernels"] = kernel_profile(lambda: runner.infer(device_feed), profile_iters, device)
    if outputs is not None:  # the first output, float32 on the host, for comparisons
        from fluxrt.dtypes import to_float32

        y = runner.infer(device_feed)[spec.output_names[0]]
        outputs[onnx_path] = np.asarray(to_float32(y.get() if hasattr(y, "get") else y))
    runner.deactivate()
    return stats


def bench_component(component: str, layers, shape: Shape, precisions: list[str], modes: list[str], work: Path,
                    results: Results, warmup: int, iters: int, attentions: tuple[str, ...], device: str,
                    cuda_graph: str = "auto", optimize: bool = True, profile_iters: int = 0,
                    ort_variants: tuple[tuple[str, ...], ...] = (ORT_CUDA_DISABLED_OPTIMIZERS,),
                    reuse: bool = False, export_only: bool = False) -> None:
    label = component + (f"[{'+'.join(map(str, layers))}]" if layers else "")
    t = CONFIG["transformer"]
    flops = (bench.transformer_flops(shape.batch, shape.image_tokens, shape.text, layers[0], layers[1],
                                     inner=t["num_attention_heads"] * t["attention_head_dim"],
                                     joint_dim=t["joint_attention_dim"], pooled_dim=t["pooled_projection_dim"])
             if component == "transformer" else None)
    common = dict(component=component, layers=list(layers) if layers else None, shape=vars(shape), flops=flops)
    torch_out = {}  # mode -> first output, for torchao's FP8 against eager bf16 on the same input
    for mode in TORCH_MODES:
        if mode not in modes:
            continue
        if mode == TORCHAO_MODE and component != "transformer":
            results.add(**common, backend=f"torch-{mode}", precision="fp8",
                        error="torchao FP8 is timed for the transformer only")
            continue
        module = build(component, torch.bfloat16, device, layers)
        try:
            extra = torchao_fp8(module) if mode == TORCHAO_MODE else {}
        except Exception as e:  # keep timing the other modes; the reason is in the results
            results.add(**common, backend=f"torch-{mode}", precision="fp8", error=str(e)[:500])
            del module
            free_memory(device)
            continue
        fn = graph_module(component, module, rewrite="none")  # diffusers' modules as users run them
        if mode != "eager":
            fn = torch.compile(fn)
        feed = inputs(component, shape, torch.bfloat16, device)
        args = [feed[n] for n in component_spec("vae_decoder" if component == "vae" else component, DIMS).input_names]
        with torch.inference_mode():
            start = time.perf_counter()
            out = fn(*args)
            sync(device)()
            first = time.perf_counter() - start
            torch_out[mode] = (out[0] if isinstance(out, (tuple, list)) else out).float()
            stats = time_torch(lambda: fn(*args), warmup, iters, device)
            if profile_iters and device == "cuda":
                stats["kernels"] = kernel_profile(lambda: fn(*args), profile_iters, device)
        if mode == TORCHAO_MODE and "eager" in torch_out:
            a, b = torch_out[mode], torch_out["eager"]
            extra["vs_bf16_rel_rms"] = float(((a - b).pow(2).mean() / b.pow(2).mean()).sqrt())
        results.add(**common, backend=f"torch-{mode}", precision="fp8" if mode == TORCHAO_MODE else "bf16",
                    first_call_s=first, **stats, **extra,
                    tflops=flops / stats["p50_ms"] * 1e-9 if flops else None,
                    gpu_peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None)
        del module, fn, out
        free_memory(device)
    if "ort" not in modes:
        return
    outputs: dict = {}  # graph path -> first output, for FP8 against its bf16 source
    for attention, precision in [(a, p) for a in (attentions if component == "transformer" else attentions[:1])
                                 for p in precisions]:
        fp8 = precision == "fp8"  # fluxrt's FP8 ops over the ort-kernels graph: bf16 (fp32 on the CPU, whose
        base = ("bf16" if device == "cuda" else "fp32") if fp8 else precision  # kernels compute in float32)
        if fp8 and (component != "transformer" or attention != "ort-kernels"):
            results.add(**common, backend=attention, precision=precision,
                        error="fp8 is timed for the transformer with --attention ort-kernels only")
            continue
        # the exporter's rule: the VAE stays fp32 in half-precision exports
        graph_precision = component_precision("vae_decoder" if component == "vae" else component, base)
        dtype = TORCH_DTYPES[graph_precision]
        feed = inputs(component, shape, dtype, device)
        path = work / f"{label}-{attention}-{base}" / f"{component}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = path.with_name("export.json")
        if (fp8 or reuse) and path.is_file() and record.is_file():  # the graph of this run (or an earlier one)
            export = json.loads(record.read_text())
        else:
            module = build(component, dtype, device, layers)
            export = export_onnx(component, module, graph_precision, path, attention)
            atomic_write_json(record, export)
            del module
            free_memory(device)
        if export_only:
            results.add(**common, backend=attention, precision=precision, export=export, graph=str(path))
            continue
        opt_path, fused = path, {}
        if fp8:
            opt_path = work / f"{label}-{attention}-fp8" / f"{component}.onnx"
            export = dict(export, fp8=fp8_for_timing(path, host_feed(component, feed, base), opt_path, device))
            free_memory(device)
        elif optimize:
            try:
                opt_path, fused = ort_optimize(path, component, device)
            except Exception as e:  # the optimizer is best effort: measure the plain graph and say why
                fused = {"optimizer_error": str(e)[:300]}
        choices = {"both": (True, False), "auto": (True, False), "on": (True,), "off": (False,)}[cuda_graph]
        for disabled in ort_variants:
            backend = ort_label(disabled, attention if component == "transformer" else "ort", device)
            for use_graph in choices if device == "cuda" else (False,):
                try:
                    stats = time_ort(component, opt_path, graph_precision, feed, shape, warmup, iters, use_graph,
                                     device, profile_iters, disabled, attention, outputs)
                    if fp8 and path not in outputs and path.is_file():  # its bf16 source, on the same input
                        time_ort(component, path, graph_precision, feed, shape, 0, 1, False, device,
                                 attention=attention, outputs=outputs)
                    if fp8:
                        a, b = outputs[opt_path], outputs[path]
                        stats["vs_bf16_rel_rms"] = float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))
                except Exception as e:
                    results.add(**common, backend=backend, precision=precision, cuda_graph=use_graph,
                                error=str(e)[:500])
                    continue
                results.add(**common, backend=backend, precision=precision, graph_precision=graph_precision,
                            cuda_graph=use_graph, attention=attention, disabled_optimizers=list(disabled),
                            fused_ops=fused, export=export, **stats,
                            tflops=flops / stats["p50_ms"] * 1e-9 if flops else None,
                            gpu_used_gib=(bench.gpu_memory_used_bytes() or 0) / 2**30)
                if cuda_graph == "auto":
                    break
        del feed
        free_memory(device)


def torchao_fp8(module: torch.nn.Module) -> dict:
    """``module``'s linears on torchao's FP8 (E4M3 activations quantized per row at run time, weights per row):
    what users pick for FLUX in FP8 with torch.compile."""
    try:
        import torchao
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as e:
        raise InvalidInputError(f"--modes {TORCHAO_MODE} needs torchao, which could not be imported ({e})") from None
    count = sum(isinstance(m, torch.nn.Linear) for m in module.modules())
    quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return {"torchao": torchao.__version__, "torchao_config": "Float8DynamicActivationFloat8WeightConfig(PerRow)",
            "linears": count}


def ort_label(disabled: tuple[str, ...], attention: str = "ort", device: str = "cuda") -> str:
    """"ort-cuda" for the runtime's own session settings and the fused graph, "ort-cuda+kernels"
    for the graph with fluxrt's kernels, then "/..." for session settings that differ."""
    base = ("ort-cuda" if device == "cuda" else "ort-cpu") + ("+kernels" if attention == "ort-kernels" else "")
    if tuple(disabled) == ORT_CUDA_DISABLED_OPTIMIZERS:
        return base
    return base + "/" + (f"no-{'+'.join(disabled)}" if disabled else "all-optimizers")


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run(out: Path, plan: list[tuple[str, tuple | None]], shape: Shape, precisions: list[str], modes: list[str],
        warmup: int, iters: int, attention: str | tuple[str, ...] = "ort", device: str = "cuda", cuda_graph: str = "auto",
        optimize: str = "t5,clip,vae", profile_iters: int = 0,
        ort_variants: tuple[tuple[str, ...], ...] = (ORT_CUDA_DISABLED_OPTIMIZERS,), reuse: bool = False,
        export_only: bool = False) -> dict:
    attentions = (attention,) if isinstance(attention, str) else tuple(attention)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("FLUXRT_BENCH_WORK", "/tmp/fluxrt-bench"))
    work.mkdir(parents=True, exist_ok=True)
    results = Results(out / "results.json", dict(model=DIMS.to_json(), plan=[[c, list(l) if l else None] for c, l in plan],
                                                 shape=vars(shape), precisions=precisions, modes=modes,
                                                 warmup=warmup, iters=iters, attention=list(attentions)))
    for component, layers in plan:
        log(f"{component} {layers}: start")
        try:
            bench_component(component, layers, shape, precisions, modes, work, results, warmup, iters, attentions,
                            device, cuda_graph, component in optimize.split(","), profile_iters, ort_variants, reuse,
                            export_only)
        except Exception as e:  # keep measuring the other components; the error is in the results
            results.add(component=component, layers=list(layers) if layers else None, error=repr(e)[:800])
    return results.data


PLAN_COMPONENTS = {"transformer": 2, "t5": 1, "clip": 0, "vae": 0}  # how many layer counts each takes
SYNTHETIC_PRECISIONS = ("fp16", "bf16", "fp32", "fp8")
TORCHAO_MODE = "torchao-fp8"  # torchao float8 dynamic activations, row-wise weights, then torch.compile
TORCH_MODES = ("eager", "compile", TORCHAO_MODE)
SYNTHETIC_MODES = (*TORCH_MODES, "ort")


def parse_plan(text: str) -> list[tuple[str, tuple | None]]:
    """``"transformer:1+2,transformer:2+4,t5:2,t5:4,clip,vae"``."""
    plan = []
    for item in text.split(","):
        name, _, layers = item.partition(":")
        if name not in PLAN_COMPONENTS:
            raise InvalidInputError(f"--plan item {item!r}: component {name!r} is not one of {list(PLAN_COMPONENTS)}")
        try:
            counts = tuple(int(x) for x in layers.split("+")) if layers else None
        except ValueError:
            counts = ()
        if counts is not None and (len(counts) != PLAN_COMPONENTS[name] or min(counts) < 1):
            raise InvalidInputError(f"--plan item {item!r}: {name} takes "
                                    f"{['no layer count', 'one layer count, t5:LAYERS', 'DOUBLE+SINGLE block counts'][PLAN_COMPONENTS[name]]}"
                                    f" of positive integers")
        if name == "transformer" and counts is None:
            raise InvalidInputError(f"--plan item {item!r}: transformer takes DOUBLE+SINGLE block counts "
                                    f"(19+38 is the whole FLUX.1-dev)")
        plan.append((name, counts))
    return plan


def check_args(a) -> None:
    """Every flag checked before anything is exported or timed."""
    for flag, given, allowed in (("--precisions", a.precisions, SYNTHETIC_PRECISIONS),
                                 ("--modes", a.modes, SYNTHETIC_MODES), ("--attention", a.attention, ATTENTION_MODES)):
        items = [x for x in given.split(",")]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise InvalidInputError(f"{flag} {given!r}: each must be one of {list(allowed)}")
    for flag, value, low in (("--height", a.height, 16), ("--width", a.width, 16), ("--batch", a.batch, 1),
                             ("--text", a.text, 1), ("--warmup", a.warmup, 0), ("--iters", a.iters, 1),
                             ("--profile", a.profile, 0)):
        if value < low:
            raise InvalidInputError(f"{flag} must be at least {low}, got {value}")
    for flag, value in (("--height", a.height), ("--width", a.width)):
        if value % 16:
            raise InvalidInputError(f"{flag} must be a multiple of 16 pixels, got {value}")
    if a.text > 512:
        raise InvalidInputError(f"--text must be at most 512 T5 tokens, got {a.text}")
    if TORCHAO_MODE in a.modes.split(",") and a.device != "cuda":
        raise InvalidInputError(f"--modes {TORCHAO_MODE} runs on --device cuda (torchao's FP8 matrix products need "
                                f"an Ada or Hopper GPU), got --device {a.device}")
    if a.reuse_exports and a.export_only:
        raise InvalidInputError("--reuse-exports times an earlier export and --export-only only exports: pass one")
    if a.out.exists() and not a.out.is_dir():
        raise InvalidInputError(f"--out {a.out} is not a folder")


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="fluxrt bench-synthetic")
    p.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    p.add_argument("--plan", default="transformer:1+2,transformer:2+4",
                   help="comma-separated COMPONENT[:DOUBLE+SINGLE] items: clip, t5[:LAYERS], transformer:D+S (blocks; "
                        "19+38 is the whole FLUX.1-dev), vae (default transformer:1+2,transformer:2+4)")
    p.add_argument("--precisions", default="fp16,bf16",
                   help="comma-separated from fp16, bf16, fp32, fp8 (default fp16,bf16); fp8: the ort-kernels "
                        "transformer on fluxrt's FP8 ops, over its bf16 export")
    p.add_argument("--modes", default="eager,compile,ort",
                   help="comma-separated from eager, compile (torch, bf16), torchao-fp8 (torchao's float8 dynamic "
                        "activations with row-wise weights, then torch.compile; CUDA only), ort (default "
                        "eager,compile,ort)")
    p.add_argument("--attention", default="ort",
                   help="transformer graphs to time, comma-separated: portable, ort, ort-kernels (needs the "
                        "library of `fluxrt ort-ops build`)")
    p.add_argument("--height", type=int, default=1024, help="pixels, a positive multiple of 16 (default 1024)")
    p.add_argument("--width", type=int, default=1024, help="pixels, a positive multiple of 16 (default 1024)")
    p.add_argument("--text", type=int, default=512, help="T5 tokens, 1..512 (default 512)")
    p.add_argument("--batch", type=int, default=1, help="images per call, >= 1 (default 1)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first, >= 0 (default 3)")
    p.add_argument("--iters", type=int, default=20, help="timed calls, >= 1 (default 20)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--model", default="flux-dev", choices=("flux-dev", "tiny"))
    p.add_argument("--cuda-graph", default="auto", choices=("auto", "both", "on", "off"),
                   help="auto: with a CUDA graph, without one only if capture fails")
    p.add_argument("--optimize", default="t5,clip,vae",
                   help="components to pass through onnxruntime.transformers' optimizer first")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N more calls per backend: GPU kernel time by kernel and class")
    p.add_argument("--ort-variants", default="MatMulAddFusion",
                   help="ONNX Runtime sessions to time per graph, ';'-separated, each a comma list of graph "
                        "optimizers to disable ('' = all enabled), e.g. ';MatMulAddFusion'. Default: the "
                        "runtime's own choice on CUDA (MatMulAddFusion disabled)")
    p.add_argument("--reuse-exports", action="store_true",
                   help="time the graphs an earlier run left in $FLUXRT_BENCH_WORK (with their export.json) instead "
                        "of exporting again: a long export in one call, the timing in the next")
    p.add_argument("--export-only", action="store_true",
                   help="export the ONNX Runtime graphs (and their export.json) without timing them")
    a = p.parse_args(argv)
    check_args(a)
    plan = parse_plan(a.plan)
    use_model(a.model)
    run(a.out, plan, Shape(a.batch, a.height, a.width, a.text), a.precisions.split(","),
        a.modes.split(","), a.warmup, a.iters, tuple(a.attention.split(",")), a.device, a.cuda_graph, a.optimize, a.profile,
        tuple(tuple(n for n in v.split(",") if n) for v in a.ort_variants.split(";")), a.reuse_exports, a.export_only)


if __name__ == "__main__":
    main()


# ---- report: extrapolation to the full model --------------------------------------------------------

FULL_UNITS = 19  # FLUX.1-dev: 19 x (1 double + 2 single) blocks
FULL_T5_LAYERS = 24


def key(m: dict) -> tuple[str, str]:
    return m["backend"], m.get("precision", "")


def extrapolate(points: dict[int, float], full: int) -> tuple[float, float, float]:
    """Two depths -> (fixed part, per-unit slope, value at ``full``) of a straight line."""
    (d1, t1), (d2, t2) = sorted(points.items())
    slope = (t2 - t1) / (d2 - d1)
    fixed = t1 - slope * d1
    return fixed, slope, fixed + slope * full


def full_model_table(measurements: list[dict]) -> list[dict]:
    ok = [m for m in measurements if "p50_ms" in m]
    rows = []
    for m_key in sorted({key(m) for m in ok}):
        row = {"backend": m_key[0], "precision": m_key[1]}
        tr = {m["layers"][0]: m["p50_ms"] for m in ok if m["component"] == "transformer" and key(m) == m_key}
        if len(tr) == 2:
            row["transformer_fixed_ms"], row["transformer_per_unit_ms"], row["transformer_step_ms"] = \
                extrapolate(tr, FULL_UNITS)
            row["transformer_tflops"] = bench.transformer_flops(1, 4096, 512, 19, 38) / row["transformer_step_ms"] * 1e-9
        t5 = {m["layers"][0]: m["p50_ms"] for m in ok if m["component"] == "t5" and key(m) == m_key}
        if len(t5) == 2:
            row["t5_ms"] = extrapolate(t5, FULL_T5_LAYERS)[2]
        for comp in ("clip", "vae"):
            found = [m for m in ok if m["component"] == comp and key(m) == m_key]
            if found:
                row[f"{comp}_ms"] = found[0]["p50_ms"]
        if all(k in row for k in ("transformer_step_ms", "t5_ms", "clip_ms", "vae_ms")):
            row["generation_28_steps_ms"] = row["clip_ms"] + row["t5_ms"] + 28 * row["transformer_step_ms"] + row["vae_ms"]
        rows.append(row)
    eager = next((r for r in rows if r["backend"] == "torch-eager"), {})
    for r in rows:
        for k in ("transformer_step_ms", "t5_ms", "clip_ms", "vae_ms", "generation_28_steps_ms"):
            if k in r and eager.get(k):
                r[k.replace("_ms", "_vs_eager")] = r[k] / eager[k]
    return rows


def export_table(measurements: list[dict]) -> list[dict]:
    rows = []
    for precision in sorted({m["precision"] for m in measurements if "export" in m}):
        ex = {m["component"] + str(m["layers"]): m["export"] for m in measurements
              if "export" in m and m["precision"] == precision}
        row = {"precision": precision}
        for comp, full, depth in (("transformer", FULL_UNITS, lambda l: l[0]), ("t5", FULL_T5_LAYERS, lambda l: l[0])):
            pts = {depth(m["layers"]): m["export"] for m in measurements
                   if "export" in m and m["precision"] == precision and m["component"] == comp}
            if len(pts) == 2:
                for field in ("export_seconds", "export_peak_rss_gib", "weights_gib"):
                    row[f"{comp}_{field}"] = extrapolate({d: v[field] for d, v in pts.items()}, full)[2]
        for comp in ("clip", "vae"):
            e = ex.get(comp + "None")
            if e:
                for field in ("export_seconds", "export_peak_rss_gib", "weights_gib"):
                    row[f"{comp}_{field}"] = e[field]
        rows.append(row)
    return rows


KERNEL_COLUMNS = ("gemm", "attention", "triton", "fluxrt", "norm", "rotary", "gelu", "elementwise", "cast", "copy", "reduce",
                  "other")


def kernel_rows(measurements: list[dict]) -> list[dict]:
    """One row per profiled measurement: wall p50, summed kernel time and its split by kind."""
    rows = []
    for m in measurements:
        k = m.get("kernels")
        if not k:
            continue
        row = {"component": m["component"], "layers": "+".join(map(str, m["layers"])) if m.get("layers") else "all",
               "backend": m["backend"], "precision": m.get("graph_precision") or m.get("precision"),
               "p50 wall": round(m["p50_ms"], 3), "gpu": round(k["gpu_ms"], 3)}
        row.update({c: round(k["by_class_ms"].get(c, 0.0), 3) for c in KERNEL_COLUMNS})
        rows.append(row)
    return rows


def report(result_files: list[Path], out_dir: Path) -> dict:
    measurements, settings, machine = [], [], {}
    for f in result_files:
        data = json.loads(Path(f).read_text())
        measurements += data["measurements"]
        settings.append(data["settings"])
        machine = data.get("machine") or machine
    full = full_model_table(measurements)
    exports = export_table(measurements)
    out = {"machine": machine, "settings": settings, "full_model": full, "export": exports,
           "method": __doc__.strip(), "measurements": measurements}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "h100.json", out)
    cols = [("backend", "backend"), ("precision", "precision"), ("transformer_step_ms", "transformer step ms"),
            ("transformer_step_vs_eager", "x eager"), ("transformer_tflops", "TFLOP/s"), ("clip_ms", "CLIP ms"),
            ("clip_vs_eager", "x eager"), ("t5_ms", "T5 ms"), ("t5_vs_eager", "x eager"), ("vae_ms", "VAE ms"),
            ("vae_vs_eager", "x eager"), ("generation_28_steps_ms", "28-step generation ms"),
            ("generation_28_steps_vs_eager", "x eager")]
    slices = [dict(component=m["component"], layers="+".join(map(str, m["layers"])) if m.get("layers") else "all",
                   backend=m["backend"], precision=m.get("graph_precision") or m.get("precision"),
                   p50=m["p50_ms"], p90=m["p90_ms"], p99=m["p99_ms"], tflops=m.get("tflops") or "")
              for m in measurements if "p50_ms" in m]
    errors = [dict(component=m["component"], backend=m.get("backend", ""), precision=m.get("precision", ""),
                   cuda_graph=m.get("cuda_graph", ""), error=m["error"][:160].replace("|", "/"))
              for m in measurements if "error" in m]
    text = ["# Full-size FLUX.1-dev on one H100: per-stage latency (batch 1, 1024x1024, 512 text tokens)\n",
            "Extrapolated to the full model from the measured slices (method below), p50 of 20 timed runs.\n",
            bench.markdown_table(full, cols), "\n## Measured points\n", bench.markdown_table(slices, [
                ("component", "component"), ("layers", "layers"), ("backend", "backend"), ("precision", "precision"),
                ("p50", "p50 ms"), ("p90", "p90 ms"), ("p99", "p99 ms"), ("tflops", "TFLOP/s")]),
            "\n## Export (host side, extrapolated the same way)\n",
            bench.markdown_table(exports, [(k, k) for k in dict.fromkeys(k for row in exports for k in row)]),
            "\n## GPU kernel time per call, by kind (CUPTI; ms)\n", bench.markdown_table(kernel_rows(measurements), [
                (k, k) for k in ("component", "layers", "backend", "precision", "p50 wall", "gpu") + KERNEL_COLUMNS]),
            "\n## Attempts that failed\n", bench.markdown_table(errors, [(k, k) for k in
                                                                       ("component", "backend", "precision",
                                                                        "cuda_graph", "error")]),
            "\n## Method\n", __doc__.strip() + "\n"]
    (out_dir / "h100.md").write_text("\n".join(text))
    rows = [{"config": f"{r['backend']} {r['precision']}", "stage": s.replace("_ms", ""), "ms": r[s]}
            for r in full for s in ("transformer_step_ms", "t5_ms", "clip_ms", "vae_ms") if s in r]
    bench.bar_chart(rows, "config", "stage", "ms", "FLUX.1-dev on H100, p50 ms per stage (transformer: one step)",
                    out_dir / "h100.png")
    return out
