"""Benchmark discipline and reports, and ``fluxrt bench``: the runtime's stages over export or
engine folders, timed side by side in one run.

Every timing excludes warm-up runs and synchronizes the device before reading the clock.
The transformer's achieved TFLOP/s uses the analytic count in :func:`transformer_flops`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fluxrt.artifacts import EXPORT_MANIFEST_COPY
from fluxrt.errors import InvalidInputError
from fluxrt.files import atomic_path, atomic_write_json, atomic_write_text


def device_sync() -> None:
    """Wait for all GPU work (cupy's and any other library's on the same device) to finish."""
    if "cupy" in sys.modules:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            cupy.cuda.runtime.deviceSynchronize()
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def time_call(fn: Callable[[], object], warmup: int = 2, iters: int = 10,
              sync: Callable[[], None] = device_sync) -> list[float]:
    """Seconds per call of ``fn``: ``warmup`` calls discarded, then ``iters`` timed one by one."""
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return samples


def summarize(samples: list[float]) -> dict:
    """Milliseconds: p50, p90, p99, mean, min, and the number of timed runs."""
    ms = np.asarray(samples) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "runs": len(samples)}


def transformer_flops(batch: int, image_tokens: int, text_tokens: int, num_double: int, num_single: int,
                      inner: int = 3072, mlp_ratio: float = 4.0, in_channels: int = 64, joint_dim: int = 4096,
                      pooled_dim: int = 768, time_dim: int = 256, guidance: bool = True) -> float:
    """Floating-point operations (multiply-adds count 2) of one FLUX transformer step.

    With L = N + S tokens, D = inner width, r = mlp ratio, each block costs
        2·L·D·(3D + D + 2rD)   projections (qkv, output, MLP in and out; single blocks fuse the same
                               matrices into linear1 = [qkv | mlp-in] and linear2 = [out | mlp-out])
      + 4·L²·D                 attention scores and weighted sum
      + 2·2·6D·D or 2·3D·D     the adaptive-norm modulation of one token per sample
    i.e. about 24·L·D² + 4·L²·D per block for r = 4; plus the embedders and the final projection.
    """
    d, L = inner, image_tokens + text_tokens
    proj = 2 * L * d * (4 * d + 2 * mlp_ratio * d)
    attn = 4 * L * L * d
    double = proj + attn + 2 * 2 * (6 * d) * d
    single = proj + attn + 2 * (3 * d) * d
    embed = 2 * image_tokens * in_channels * d + 2 * text_tokens * joint_dim * d
    vec = 2 * (time_dim * d + d * d) * (3 if guidance else 2) + 2 * (pooled_dim * d - time_dim * d)
    final = 2 * (2 * d) * d + 2 * image_tokens * d * in_channels
    return float(batch * (num_double * double + num_single * single + embed + vec + final))


def gaussian_blur(x: np.ndarray, sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    """``x`` [H, W] filtered by a normalised Gaussian over both axes, borders mirrored (d c b a | a b c d)."""
    radius = int(truncate * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(x, pad, mode="symmetric")
        n = x.shape[axis]
        x = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(taps))
    return x


def ssim(images, reference, data_range: float = 1.0, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang, Bovik, Sheikh and Simoncelli 2004) of images [..., H, W, C] in
    [0, ``data_range``]: Gaussian window (sigma 1.5, 11 taps), K1 = 0.01, K2 = 0.03, each channel of each image,
    the map's borders (half a window) left out, averaged; scikit-image's ``structural_similarity`` with
    ``gaussian_weights=True, use_sample_covariance=False``."""
    a, b = np.asarray(images, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape or a.ndim < 3:
        raise ValueError(f"ssim needs two image arrays [..., H, W, C] of one shape, got {a.shape} and {b.shape}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    crop = int(3.5 * sigma + 0.5)
    scores = []
    for x, y in zip(a.reshape(-1, *a.shape[-3:]), b.reshape(-1, *b.shape[-3:])):
        for c in range(x.shape[-1]):
            u, v = x[..., c], y[..., c]
            mu, mv = gaussian_blur(u, sigma), gaussian_blur(v, sigma)
            vu = gaussian_blur(u * u, sigma) - mu * mu
            vv = gaussian_blur(v * v, sigma) - mv * mv
            cov = gaussian_blur(u * v, sigma) - mu * mv
            s = ((2 * mu * mv + c1) * (2 * cov + c2)) / ((mu * mu + mv * mv + c1) * (vu + vv + c2))
            scores.append(s[crop:-crop, crop:-crop].mean())
    return float(np.mean(scores))


def image_quality(images, reference) -> dict:
    """Max/mean absolute difference (images [..., H, W, C] in [0, 1]), PSNR in dB and SSIM against ``reference``."""
    a, b = np.asarray(images, np.float64), np.asarray(reference, np.float64)
    diff = np.abs(a - b)
    mse = float((diff ** 2).mean())
    out = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
           "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))}
    if a.ndim >= 3 and min(a.shape[-3:-1]) > 2 * int(3.5 * 1.5 + 0.5):
        out["ssim"] = ssim(a, b)
    return out


def machine_info() -> dict:
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count()}
    for name in ("numpy", "onnxruntime", "torch", "cupy", "tensorrt", "tensorrt_rtx_bindings", "diffusers"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = getattr(module, "__version__", "?")
    if "cupy" in sys.modules:
        try:
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(0)
            info["gpu"] = props["name"].decode()
            info["gpu_memory_gib"] = round(props["totalGlobalMem"] / 2**30, 1)
        except Exception:  # no device: the report simply has no GPU entry
            pass
    return info


def gpu_memory_used_bytes() -> int | None:
    """Device memory in use now (all allocators: ONNX Runtime's arena keeps its peak)."""
    if "cupy" not in sys.modules:
        return None
    import cupy

    free, total = cupy.cuda.runtime.memGetInfo()
    return int(total - free)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = []
    for row in rows:
        cells = []
        for key, _ in columns:
            v = row.get(key, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule] + body) + "\n"


def bar_chart(rows: list[dict], label_key: str, group_key: str, value_key: str, title: str, path: Path) -> None:
    """A grouped horizontal bar chart drawn with Pillow (no plotting library needed)."""
    from PIL import Image, ImageDraw

    groups = list(dict.fromkeys(r[group_key] for r in rows))
    labels = list(dict.fromkeys(r[label_key] for r in rows))
    values = {(r[group_key], r[label_key]): r[value_key] for r in rows if r.get(value_key) is not None}
    vmax = max(values.values(), default=1.0) or 1.0
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    bar_h, gap, left, width = 14, 10, 190, 820
    height = 60 + len(groups) * (len(labels) * bar_h + gap) + 20 * len(labels)
    img = Image.new("RGB", (width + left + 120, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black")
    y = 40
    for g in groups:
        draw.text((10, y), str(g), fill="black")
        for i, label in enumerate(labels):
            v = values.get((g, label))
            if v is not None:
                w = int(width * v / vmax)
                draw.rectangle([left, y, left + w, y + bar_h - 2], fill=palette[i % len(palette)])
                draw.text((left + w + 4, y), f"{v:.1f}", fill="black")
            y += bar_h
        y += gap
    for i, label in enumerate(labels):
        draw.rectangle([left, y + 4, left + 10, y + 14], fill=palette[i % len(palette)])
        draw.text((left + 16, y + 2), str(label), fill="black")
        y += 20
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


# ---- fluxrt bench: stages of the runtime pipeline over export or engine folders -------------------

PRECISION_RANK = {"fp32": 0, "bf16": 1, "fp16": 2, "fp8": 3}


CUDA_GRAPH_BACKEND = "ort-cuda+graph"  # ort-cuda, the transformer replayed from a CUDA graph


@dataclass(frozen=True)
class BenchConfig:
    label: str
    path: Path
    backend: str


@dataclass(frozen=True)
class BenchSettings:
    prompt: str = "a lighthouse on a cliff at dawn, oil painting"
    height: int = 1024
    width: int = 1024
    steps: int = 4
    text_length: int = 512
    batch: int = 1
    seed: int = 0
    warmup: int = 2
    iters: int = 10

    def __post_init__(self) -> None:
        for name in ("height", "width", "steps", "text_length", "batch", "iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchSettings.{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"BenchSettings.warmup must be >= 0, got {self.warmup}")


def log(msg: str) -> None:
    print(f"[fluxrt bench] {msg}", file=sys.stderr, flush=True)


def transformer_config(pipe) -> dict | None:
    """The transformer's architecture as the export manifest recorded it (for the FLOP count)."""
    manifest = pipe.folder.manifest if pipe.folder.kind == "export" else read_export_manifest(pipe.folder.root)
    config = (manifest or {}).get("transformer_config") or {}
    return config if "num_layers" in config else None


def read_export_manifest(root: Path) -> dict | None:
    path = Path(root) / EXPORT_MANIFEST_COPY
    return json.loads(path.read_text()) if path.is_file() else None


def load_pipeline(config: BenchConfig):
    """The pipeline of one configuration; the torch backend's runners are injected from the export side."""
    from fluxrt.artifacts import ExportFolder
    from fluxrt.runtime.pipeline import FluxPipeline

    if config.backend == "torch":
        from fluxrt.export.torch_runner import torch_runners

        return FluxPipeline.load(config.path, runners=torch_runners(ExportFolder.open(config.path)))
    graph = config.backend == CUDA_GRAPH_BACKEND
    return FluxPipeline.load(config.path, backend="ort-cuda" if graph else config.backend, cuda_graph=graph)


def bench_one(config: BenchConfig, s: BenchSettings) -> tuple[dict, np.ndarray]:
    """Per-stage latency of one pipeline, and its images for the quality comparison."""
    from fluxrt.runtime import loop, sampling

    log(f"{config.label}: loading {config.path} on {config.backend}")
    pipe = load_pipeline(config)
    p = pipe.params([s.prompt] * s.batch, s.height, s.width, s.steps, None, s.text_length, 1, s.seed)
    r = pipe.runners
    clip_ids = pipe.clip_tokenizer.encode(list(p.prompts), pipe.dims.clip_max_length)
    t5_ids = pipe.t5_tokenizer.encode(list(p.prompts), s.text_length)
    latents = pipe.initial_latents(p)  # [B, N, 64]
    pooled, text = pipe.encode_prompts(p.prompts, s.text_length)
    device_latents = loop.to_device(r["transformer"], latents)
    sigmas = sampling.get_sigmas(s.steps, latents.shape[1], pipe.scheduler_config)
    img_ids = sampling.image_ids(s.height, s.width, pipe.dims.vae_scale_factor)
    h, w = sampling.latent_size(s.height, s.width, pipe.dims.vae_scale_factor)
    vae_latent = loop.cast_input(r["vae_decoder"], "latent", np.zeros((s.batch, pipe.dims.latent_channels, h, w),
                                                                       np.float32))

    def denoise(schedule):
        return loop.denoise(r["transformer"], device_latents, pooled, text, img_ids, schedule, p.guidance_scale)

    stages = {
        "clip": lambda: loop.run_stage(r["clip"], {"input_ids": clip_ids}),
        "t5": lambda: loop.run_stage(r["t5"], {"input_ids": t5_ids}),
        "transformer_step": lambda: denoise(sigmas[:2]),
        "denoise_loop": lambda: denoise(sigmas),
        "vae_decode": lambda: loop.run_stage(r["vae_decoder"], {"latent": vae_latent}),
        "generation": lambda: pipe(list(p.prompts), height=s.height, width=s.width, num_inference_steps=s.steps,
                                   max_sequence_length=s.text_length, latents=latents, output_type="np"),
    }
    result = {"label": config.label, "path": str(config.path), "backend": config.backend,
              "precision": pipe.folder.precision, "variant": pipe.variant, "stages": {}}
    for name, fn in stages.items():
        log(f"{config.label}: {name}")
        stats = summarize(time_call(fn, warmup=s.warmup, iters=s.iters))
        result["stages"][name] = stats
    tconfig = transformer_config(pipe)
    if tconfig:
        n = (s.height // 16) * (s.width // 16)
        flops = transformer_flops(s.batch, n, s.text_length, tconfig["num_layers"], tconfig["num_single_layers"],
                                  inner=tconfig["num_attention_heads"] * tconfig["attention_head_dim"],
                                  joint_dim=pipe.dims.joint_attention_dim, pooled_dim=pipe.dims.pooled_projection_dim,
                                  guidance=pipe.dims.guidance)
        step = result["stages"]["transformer_step"]["p50_ms"]
        result["transformer_tflops"] = flops / step * 1e-9
        result["transformer_flops"] = flops
    gen = result["stages"]["generation"]["p50_ms"]
    result["images_per_second"] = s.batch / (gen / 1000)
    result["gpu_memory_used_gib"] = (gpu_memory_used_bytes() or 0) / 2**30 or None
    images = stages["generation"]().images
    return result, images


BENCH_BACKENDS = ("ort-cpu", "ort-cuda", CUDA_GRAPH_BACKEND, "trt", "torch")


def check_configs(configs: list[BenchConfig], s: BenchSettings) -> None:
    """Every configuration's folder opened (its manifest or engine index checked), its backend known and the
    settings inside what it takes, before the first one is timed."""
    from fluxrt.artifacts import check_envelope, open_folder
    from fluxrt.runtime.params import GenerationParams

    labels = [c.label for c in configs]
    if not configs or len(set(labels)) != len(labels):
        raise InvalidInputError(f"bench configurations need unique labels, got {labels}")
    for config in configs:
        if config.backend not in BENCH_BACKENDS:
            raise InvalidInputError(f"bench configuration {config.label!r}: backend {config.backend!r} is not one of "
                             f"{list(BENCH_BACKENDS)}")
        folder = open_folder(config.path)
        p = GenerationParams.resolve(folder.dims, [s.prompt] * s.batch, s.height, s.width, s.steps, None,
                                     s.text_length, 1, s.seed)
        if folder.kind == "engines":
            check_envelope(folder.envelope, p.batch, p.height, p.width, p.max_sequence_length)


def bench_pipelines(configs: list[BenchConfig], s: BenchSettings, out_dir: Path) -> dict:
    """Time every configuration, then write ``out_dir``/bench.json, bench.md and bench.png (the folder is made
    only then: a failed run leaves none)."""
    from dataclasses import asdict

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(f"bench output {out_dir} is not a folder")
    check_configs(configs, s)
    runs, images = [], {}
    for config in configs:
        result, imgs = bench_one(config, s)
        runs.append(result)
        images[config.label] = imgs
    reference = min(runs, key=lambda r: PRECISION_RANK.get(r["precision"], 9))
    for r in runs:
        r["quality_vs"] = reference["label"]
        r["quality"] = image_quality(images[r["label"]], images[reference["label"]])
    report = {"settings": asdict(s), "machine": machine_info(), "runs": runs,
              "flop_formula": transformer_flops.__doc__.strip()}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "bench.json", report)
    write_markdown(report, out_dir / "bench.md")
    rows = [{"config": r["label"], "stage": k, "p50_ms": v["p50_ms"]} for r in runs for k, v in r["stages"].items()]
    bar_chart(rows, "config", "stage", "p50_ms", "p50 latency per stage (ms)", out_dir / "bench.png")
    return report


def write_markdown(report: dict, path: Path) -> None:
    rows = []
    for r in report["runs"]:
        for stage, v in r["stages"].items():
            rows.append(dict(config=r["label"], backend=r["backend"], precision=r["precision"], stage=stage, **v))
    text = markdown_table(rows, [("config", "config"), ("backend", "backend"), ("precision", "precision"),
                                 ("stage", "stage"), ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"),
                                 ("p99_ms", "p99 ms"), ("runs", "runs")])
    summary = [dict(config=r["label"], ips=r["images_per_second"], tflops=r.get("transformer_tflops", ""),
                    psnr=r["quality"]["psnr_db"], max_abs=r["quality"]["max_abs"], mean_abs=r["quality"]["mean_abs"],
                    vs=r["quality_vs"]) for r in report["runs"]]
    text += "\n" + markdown_table(summary, [("config", "config"), ("ips", "images/s"), ("tflops", "transformer TFLOP/s"),
                                            ("psnr", "PSNR dB"), ("max_abs", "max |diff|"),
                                            ("mean_abs", "mean |diff|"), ("vs", "against")])
    atomic_write_text(path, f"# fluxrt bench\n\nSettings: {report['settings']}\n\n{text}")
