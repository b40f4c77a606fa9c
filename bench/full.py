"""The whole FLUX.1-dev, end to end, as users run it: fluxrt's export, quantize and runtime beside diffusers'
FluxPipeline (eager, torch.compile, torchao FP8 + torch.compile), on one GPU, in one process.

    python -m fluxrt.bench.full prepare ROOT [--model flux-dev|tiny]
        ROOT/checkpoint: a FLUX.1-dev checkpoint in the diffusers layout (model_index.json, every config, the
        tokenizers, the scheduler) without weight files. Its modules are made with seeded random weights
        straight on the device whenever a stage asks for them (:class:`RandomCheckpoint`; normal with standard
        deviation 1/sqrt(fan-in), norms 1 and 0, drawn in float32 so every precision rounds the same values), so the
        33 GB of weights are neither written nor read. Latency does not depend on the values; quality figures
        from random weights say how far a precision moves the numbers, not how an image looks.
    python -m fluxrt.bench.full export ROOT --precision bf16 [--components ...] [--device cuda]
        fluxrt's own exporter (``export_checkpoint``) on that checkpoint, into ROOT/onnx-PRECISION; the
        transformer with ``--attention ort-kernels`` (fluxrt's kernels). Then, as users do:
        ``fluxrt quantize ROOT/onnx-bf16 --out ROOT/onnx-fp8 ...``.
    python -m fluxrt.bench.full run ROOT --out OUT [--precisions fp16,bf16,fp8] [--torch eager,compile,compile-emulate,compile-regional,torchao-fp8|torchao-fp8-regional]
        One process, one configuration after another, the same prompt and the same packed initial latents:
        per stage (CLIP, T5, one transformer step, VAE decode) p50/p90/p99, and the whole generation. fluxrt's
        configurations are the folders' pipelines on ONNX Runtime CUDA with the transformer replayed from a
        CUDA graph; torch's are diffusers' FluxPipeline over the same weights in bf16, torch.compile applied to
        the transformer (as diffusers' and torchao's guides do), torchao's FP8 (float8 dynamic activations,
        row-wise weight scales) on the transformer's linears before compiling.

Quality, against the reference configuration (bf16; the first one given otherwise): the transformer's output
(the velocity) at every step of the reference's own trajectory, each configuration fed the reference's
latents and prompt embeddings (so the error is the transformer's alone, step by step), as relative RMS; and
the final images of each configuration's own whole run: max/mean absolute difference, PSNR and SSIM.

LoRA (``--lora-rank R``): a seeded LoRA of rank R on every attention linear (``random_lora``, written to
ROOT/lora-rR.safetensors) is swapped into each fluxrt configuration's loaded pipeline and out again, as a service
would: the load's seconds (merged in float32, re-quantized under FP8, a new transformer session), the first
generation after it (CUDA graphs captured again) and the next, the unload's; the LoRA image against the
configuration's own base image (what the LoRA does) and against the reference configuration's LoRA image (what
the precision does to a LoRA'd model).

``OUT/results.json`` gets each row as soon as it is measured (a run stopped by its time limit keeps what it
measured): ``component`` (clip, t5, transformer, vae_decoder, generation), ``backend``, ``precision``,
``layers`` (double and single blocks, for the transformer and the generation), ``p50_ms``, ``p90_ms``,
``p99_ms``, ``gpu``. Host time: ``glue_ms_per_step`` is the generation's time outside the four stages' own
p50s, per step (one-off work such as tokenizing and the image's copy to the host included, and the stages'
run-to-run spread with it); for fluxrt, ``loop_host_ms_per_step`` is measured directly: the sampling loop's
wall time less the transformer runner's calls, per step, and ``loop_host_fraction`` that over the step.
``report`` writes ``results.md`` and ``stages.png`` from it (``run`` does at the end).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fluxrt.bench import pipelines as bench
from fluxrt.errors import FluxRTError, InvalidInputError
from fluxrt.export.checkpoint import Checkpoint
from fluxrt.files import atomic_write_json, atomic_write_text

CHECKPOINT = "checkpoint"
COMPONENT_SUBFOLDERS = {"transformer": "transformer", "vae": "vae", "clip": "text_encoder", "t5": "text_encoder_2"}
SEED_OFFSETS = {"transformer": 0, "t5": 1, "clip": 2, "vae": 3}  # each module its own stream of the seed
# compile-emulate: torch.compile with inductor's emulate_precision_casts (rounds where eager rounds), to tell
# compile's own numerics from a difference of the model
# *-regional: diffusers' regional compilation (compile_repeated_blocks: one compiled graph per block class, reused
# by every block of it) in place of compiling the whole transformer: the same kernels' kind at a fraction of the
# compile time (torchao FP8's whole-model compile took 462 s on the H200, its first generation)
TORCH_MODES = ("eager", "compile", "compile-emulate", "compile-regional", "torchao-fp8", "torchao-fp8-regional")
TORCHAO_MODES = ("torchao-fp8", "torchao-fp8-regional")
FLUXRT_PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
STAGES = ("clip", "t5", "transformer", "vae_decoder")


def log(msg: str) -> None:
    print(f"[fluxrt bench-full] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# ---- the checkpoint -------------------------------------------------------------------------------

def model_configs(model: str) -> dict:
    from fluxrt.bench import synthetic

    if model not in ("flux-dev", "tiny"):
        raise InvalidInputError(f"--model {model!r} is not one of ['flux-dev', 'tiny']")
    if model == "flux-dev":
        return dict(synthetic.FLUX_DEV)
    tiny = synthetic.tiny_configs()  # the built-in tiny model's widths; its text encoders as shallow as its own
    return dict(tiny, clip=dict(tiny["clip"], num_hidden_layers=2), t5=dict(tiny["t5"], num_layers=2))


def prepare(root: str | Path, model: str = "flux-dev") -> Path:
    """Write ROOT/checkpoint (see the module doc) and return it. Its text encoders embed the vocabularies of
    the bundled tokenizers (fluxrt's tiny ones, trained here: no tokenizer can be downloaded), so their
    embedding tables are smaller than FLUX's (one row lookup per token either way: no effect on latency)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5TokenizerFast

    from fluxrt.export.quiet import quiet_hf
    from fluxrt.export.tiny import SCHEDULER_CONFIGS
    from fluxrt.export.tokenizers_tiny import write_tiny_tokenizers

    configs = model_configs(model)
    ckpt = Path(root) / CHECKPOINT
    if ckpt.exists():
        raise InvalidInputError(f"{ckpt} already exists: prepare writes a new checkpoint folder")
    staging = ckpt.with_name(f".{CHECKPOINT}.staging")
    import shutil

    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with quiet_hf():
        write_tiny_tokenizers(staging / "tokenizer", staging / "tokenizer_2")
        tok = CLIPTokenizer.from_pretrained(staging / "tokenizer")
        tok2 = T5TokenizerFast.from_pretrained(staging / "tokenizer_2")
        clip = CLIPTextConfig(**dict(configs["clip"], vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        t5 = T5Config(**dict(configs["t5"], vocab_size=len(tok2), pad_token_id=tok2.pad_token_id,
                             eos_token_id=tok2.eos_token_id, decoder_start_token_id=0))
        clip.save_pretrained(staging / "text_encoder")
        t5.save_pretrained(staging / "text_encoder_2")
        with torch.device("meta"):
            FluxTransformer2DModel(**configs["transformer"]).save_config(staging / "transformer")
            AutoencoderKL(**configs["vae"]).save_config(staging / "vae")
        FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS["dev"]).save_config(staging / "scheduler")
    import diffusers

    index = {"_class_name": "FluxPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    atomic_write_text(staging / "model_index.json", json.dumps(index, indent=2) + "\n")
    atomic_write_text(staging / "RANDOM_WEIGHTS.md",
                      f"# {model}: configs only\n\nThe weights are made by fluxrt.bench.full.RandomCheckpoint "
                      f"(seeded, on the device); nothing here is a trained model.\n")
    staging.rename(ckpt)
    return ckpt


def randomize(module: torch.nn.Module, seed: int, device: str) -> torch.nn.Module:
    """Seeded weights in place, variance-preserving so that activations stay of order one through every layer
    (and the images are not flat): each matrix or kernel normal with standard deviation 1/sqrt(fan-in), biases
    normal(0, 0.02), norms' weights 1 and biases 0. Drawn in float32, then rounded to the module's dtype: the
    bf16 and fp16 modules of one seed hold the same values, rounded."""
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            std = 0.02 if p.ndim == 1 else 1.0 / float(p[0].numel()) ** 0.5
            p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).mul_(std))
    return module.eval().requires_grad_(False)


def random_module(component: str, config: dict, dtype: torch.dtype, device: str, seed: int) -> torch.nn.Module:
    """A FLUX module from its checkpoint config, built on the meta device and materialised on ``device`` in
    ``dtype`` (one copy of the weights, made there), then :func:`randomize` d."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    factory = {"transformer": lambda: FluxTransformer2DModel(**kwargs), "vae": lambda: AutoencoderKL(**kwargs),
               "clip": lambda: CLIPTextModel(CLIPTextConfig(**config)),
               "t5": lambda: T5EncoderModel(T5Config(**config))}[component]
    with torch.device("meta"):
        module = factory()
    module = torch.nn.Module.to(module, dtype).to_empty(device=device)
    for sub_name, sub in module.named_modules():
        for name, _ in list(sub.named_buffers(recurse=False)):
            if name != "position_ids":
                raise FluxRTError(f"{component}: buffer {sub_name}.{name} would be left uninitialised by to_empty")
            sub.register_buffer(name, torch.arange(config["max_position_embeddings"], device=device).unsqueeze(0),
                                persistent=False)
    return randomize(module, seed, device)


@dataclass(frozen=True)
class RandomCheckpoint(Checkpoint):
    """A checkpoint folder without weights whose modules are made by :func:`random_module` on ``device``:
    everything fluxrt's exporter reads (configs, tokenizers, scheduler) comes from the folder as from any
    diffusers checkpoint; only the weights are seeded random numbers, the same for the exporter and torch."""

    seed: int = 0
    device: str = "cpu"

    @classmethod
    def open_random(cls, root: str | Path, seed: int = 0, device: str = "cpu") -> "RandomCheckpoint":
        base = Checkpoint.open(root)  # the folder checked as any checkpoint's: configs, tokenizers
        return cls(base.root, seed=seed, device=device)

    def check_weights(self, components) -> None:
        return None  # no weight files: they are made

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{super().fingerprint()}|seeded random weights {self.seed}".encode()).hexdigest()

    def module(self, component: str, dtype: torch.dtype) -> torch.nn.Module:
        return random_module(component, self.config(COMPONENT_SUBFOLDERS[component]), dtype, self.device,
                             self.seed * 16 + SEED_OFFSETS[component])

    def load_transformer(self, dtype: torch.dtype) -> torch.nn.Module:
        return self.module("transformer", dtype)

    def load_vae(self, dtype: torch.dtype) -> torch.nn.Module:
        return self.module("vae", dtype)

    def load_clip(self, dtype: torch.dtype) -> torch.nn.Module:
        return self.module("clip", dtype)

    def load_t5(self, dtype: torch.dtype) -> torch.nn.Module:
        return self.module("t5", dtype)


def export(root: str | Path, precision: str, components=("clip", "t5", "transformer", "vae"),
           attention: str = "ort-kernels", device: str = "cpu", seed: int = 0, others_from: str | None = None) -> dict:
    """fluxrt's exporter on ROOT/checkpoint into ROOT/onnx-PRECISION; returns the manifest. ``others_from``: the
    precision of an export in ROOT whose graphs this one lacks are linked in (hard links, no second copy: a full-size
    fp16 transformer beside the bf16 export's text encoders and VAE fits a disk that two whole exports do not); the
    manifest lists them under ``borrowed`` and each keeps its own record (its precision included)."""
    from fluxrt.export.onnx_export import ExportRequest, export_checkpoint

    root = Path(root)
    if others_from is not None and not (root / f"onnx-{others_from}" / "manifest.json").is_file():
        raise InvalidInputError(f"--others-from {others_from}: {root / f'onnx-{others_from}'} holds no export")
    ckpt = RandomCheckpoint.open_random(root / CHECKPOINT, seed=seed, device=device)
    out = root / f"onnx-{precision}"
    manifest = export_checkpoint(ckpt, out, ExportRequest(tuple(components), precision, attention=attention))
    if others_from is None:
        return manifest
    from fluxrt.artifacts import ExportFolder, write_export_manifest
    from fluxrt.engines.quantize import copy_verified

    source = ExportFolder.open(root / f"onnx-{others_from}")
    borrowed = [name for name in source.components() if name not in manifest["components"]]
    records = {name: copy_verified(source, name, out) for name in borrowed}
    write_export_manifest(out, dict(manifest, components={**manifest["components"], **records},
                                    borrowed=dict(source=str(source.root.resolve()), components=borrowed)))
    log(f"export: {out} has {borrowed} linked from {source.root}")
    return ExportFolder.open(out).manifest


# ---- the run ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSettings:
    prompt: str = "a lighthouse on a cliff at dawn, oil painting"
    height: int = 1024
    width: int = 1024
    steps: int = 28
    text_length: int = 512
    guidance: float = 3.5
    seed: int = 0
    warmup: int = 2  # per stage
    iters: int = 10
    generation_warmup: int = 1
    generation_iters: int = 3
    profile: int = 0  # transformer steps profiled under CUPTI after timing (GPU kernel time by kernel and kind)
    lora_rank: int = 0  # > 0: a seeded LoRA of this rank on every attention linear, swapped in and out per config

    def __post_init__(self) -> None:
        for name in ("height", "width", "steps", "text_length", "iters", "generation_iters"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "generation_warmup", "profile", "lora_rank"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(self, name)}")


class Results:
    """results.json, rewritten (atomically) after every row."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.data = {"settings": settings, "machine": {}, "rows": [], "exports": {}}

    def add(self, **row) -> dict:
        self.data["machine"] = bench.machine_info()
        row.setdefault("gpu", self.data["machine"].get("gpu"))
        self.data["rows"].append(row)
        self.save()
        log(json.dumps({k: v for k, v in row.items() if k not in ("per_step_rel_rms",)}, default=str))
        return row

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.data)


def host(x) -> np.ndarray:
    from fluxrt.dtypes import to_float32

    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    x = to_float32(x)
    return np.asarray(x.get() if hasattr(x, "get") else x, dtype=np.float32)


def rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).mean() / max((b ** 2).mean(), 1e-30)))


@dataclass
class Reference:
    """The reference configuration's trajectory: latents before each step, its velocities, its embeddings."""

    label: str
    latents: list  # [steps + 1] of float32 [B, N, 64]
    velocities: list  # [steps]
    pooled: np.ndarray
    text: np.ndarray
    sigmas: np.ndarray
    images: np.ndarray
    lora_images: np.ndarray | None = None


def kernel_profile(fn, iters: int, device: str) -> dict:
    """CUPTI's kernel split of ``fn`` (bench/synthetic.py). Taken after a configuration's timings: CUPTI left
    attached slows host-bound work (measured on the H200: CLIP 3.1 -> 6.1 ms, the loop's host time 0.77 -> 1.23 ms
    per step in the configuration timed after a profile), so Kineto is asked to tear it down after each profile
    (TEARDOWN_CUPTI=1) and host-bound figures are best taken from a run without --profile."""
    import os

    from fluxrt.bench.synthetic import kernel_profile as profile

    os.environ.setdefault("TEARDOWN_CUPTI", "1")
    return profile(fn, iters, device)


def stage_rows(results: Results, common: dict, stats: dict, layers, graph_precision: dict | None = None) -> None:
    """One row per stage; ``graph_precision``: each stage's graph's own precision (an fp16 folder's fp32 VAE, or a
    graph linked in from another export) where it differs from the configuration's."""
    for component, st in stats.items():
        own = (graph_precision or {}).get(component)
        results.add(component=component, layers=layers if component in ("transformer", "generation") else None,
                    **common, **st, **({"graph_precision": own} if own and own != common.get("precision") else {}))


def glue_per_step(stats: dict, steps: int) -> float | None:
    """Generation time not spent in the four stages' own calls, per step: the loop's host work and transfers."""
    if not all(k in stats for k in (*STAGES, "generation")):
        return None
    inside = sum(stats[k]["p50_ms"] for k in ("clip", "t5", "vae_decoder")) + steps * stats["transformer"]["p50_ms"]
    return (stats["generation"]["p50_ms"] - inside) / steps


def loop_host_ms(transformer, latents, pooled, text, img_ids, sigmas, guidance) -> float:
    """The sampling loop's own host time per step: the wall time of ``loop.denoise`` over every step of
    ``sigmas`` less the transformer runner's calls (each returns when its GPU work is done), in ms."""
    from fluxrt.runtime import loop

    calls = []
    start = time.perf_counter()
    loop.denoise(transformer, latents, pooled, text, img_ids, sigmas, guidance,
                 callback=lambda i, n: calls.append(transformer.last_inference_time))
    bench.device_sync()
    return (time.perf_counter() - start - sum(calls)) / (len(sigmas) - 1) * 1e3


LORA_DOUBLE = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
LORA_SINGLE = ("to_q", "to_k", "to_v")
LORA_STRENGTH = 0.3  # each update's RMS over its weight's


def random_lora(root: Path, path: Path, rank: int, seed: int = 1) -> dict:
    """A LoRA file in the diffusers/peft layout (bf16, no metadata: m = 1) on every attention linear of the
    checkpoint's transformer, as trained FLUX LoRAs commonly target: A normal(0, 1/fan-in), B normal(0,
    LORA_STRENGTH/sqrt(rank)), so that each update's RMS is LORA_STRENGTH times its weight's (1/sqrt(fan-in)).
    Returns what it wrote (path, rank, targets, parameters, bytes)."""
    from safetensors.torch import save_file

    from fluxrt.files import atomic_path

    config = json.loads((root / CHECKPOINT / "transformer" / "config.json").read_text())
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    names = [f"transformer_blocks.{i}.attn.{m}" for i in range(config["num_layers"]) for m in LORA_DOUBLE]
    names += [f"single_transformer_blocks.{i}.attn.{m}" for i in range(config["num_single_layers"])
              for m in LORA_SINGLE]
    for name in names:
        a = torch.randn(rank, dim, generator=g) / dim ** 0.5
        b = torch.randn(dim, rank, generator=g) * (LORA_STRENGTH / rank ** 0.5)
        tensors[f"transformer.{name}.lora_A.weight"] = a.to(torch.bfloat16).contiguous()
        tensors[f"transformer.{name}.lora_B.weight"] = b.to(torch.bfloat16).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    return {"path": str(path), "rank": rank, "targets": len(names),
            "parameters": sum(t.numel() for t in tensors.values()), "bytes": path.stat().st_size}


def lora_swap(pipe, lora: dict, generate, ref: Reference | None, images: np.ndarray) -> tuple[dict, np.ndarray]:
    """The LoRA swapped into a loaded pipeline and out again, as a service would: the load (merge, re-quantize
    under FP8, the new session), the first generation after it (CUDA graphs captured again) and one more, the
    unload, and whether the next image is the base one bit for bit; the LoRA image against this configuration's
    own base image, and against the reference's LoRA image."""
    out = dict(lora)
    start = time.perf_counter()
    name = pipe.load_lora(lora["path"])
    out["load_s"] = time.perf_counter() - start
    for key in ("first_generation_s", "generation_s"):
        start = time.perf_counter()
        lora_images = generate()
        bench.device_sync()
        out[key] = time.perf_counter() - start
    start = time.perf_counter()
    pipe.unload_lora(name)
    out["unload_s"] = time.perf_counter() - start
    out["base_restored"] = bool(np.array_equal(generate(), images))  # unloaded: the base image, bit for bit
    out["image_vs_base"] = bench.image_quality(lora_images, images)
    if ref is not None and ref.lora_images is not None:
        out["vs"] = ref.label
        out["image"] = bench.image_quality(lora_images, ref.lora_images)
    return out, lora_images


def run_fluxrt(label: str, folder: Path, s: RunSettings, device: str, ref: Reference | None,
               results: Results, lora: dict | None = None) -> tuple[Reference, np.ndarray]:
    from fluxrt.runtime import loop, sampling
    from fluxrt.runtime.pipeline import FluxPipeline

    backend = "ort-cuda" if device == "cuda" else "ort-cpu"
    log(f"{label}: loading {folder} on {backend}")
    start = time.perf_counter()
    pipe = FluxPipeline.load(folder, backend=backend, cuda_graph=device == "cuda")
    load_s = time.perf_counter() - start
    try:
        p = pipe.params(s.prompt, s.height, s.width, s.steps, s.guidance, s.text_length, 1, s.seed)
        r = pipe.runners
        latents = pipe.initial_latents(p)
        clip_ids = pipe.clip_tokenizer.encode(list(p.prompts), pipe.dims.clip_max_length)
        t5_ids = pipe.t5_tokenizer.encode(list(p.prompts), s.text_length)
        pooled, text = pipe.encode_prompts(p.prompts, s.text_length)
        sigmas = sampling.get_sigmas(s.steps, latents.shape[1], pipe.scheduler_config)
        img_ids = sampling.image_ids(s.height, s.width, pipe.dims.vae_scale_factor)
        on_device = loop.to_device(r["transformer"], latents)

        def step(x, i, pooled=pooled, text=text):
            return loop.denoise(r["transformer"], x, pooled, text, img_ids, sigmas[i:i + 2], p.guidance_scale)

        vae_in = loop.cast_input(r["vae_decoder"], "latent", sampling.decode_latents_scale(
            sampling.unpack_latents(latents, s.height, s.width, pipe.dims.vae_scale_factor), pipe.scaling_factor,
            pipe.shift_factor))
        calls = {"clip": lambda: loop.run_stage(r["clip"], {"input_ids": clip_ids}),
                 "t5": lambda: loop.run_stage(r["t5"], {"input_ids": t5_ids}),
                 "transformer": lambda: step(on_device, 0),
                 "vae_decoder": lambda: loop.run_stage(r["vae_decoder"], {"latent": vae_in})}
        stats = {}
        for name, fn in calls.items():
            log(f"{label}: {name}")
            stats[name] = bench.summarize(bench.time_call(fn, warmup=s.warmup, iters=s.iters))
        log(f"{label}: generation ({s.steps} steps)")
        outputs = []

        def generate():
            outputs.append(pipe(list(p.prompts), height=s.height, width=s.width, num_inference_steps=s.steps,
                                guidance_scale=s.guidance, max_sequence_length=s.text_length, latents=latents,
                                output_type="np").images)
            del outputs[:-1]

        stats["generation"] = bench.summarize(bench.time_call(generate, warmup=s.generation_warmup,
                                                              iters=s.generation_iters))
        images = outputs[-1]
        log(f"{label}: the loop's host time ({s.steps} steps)")
        host_ms = float(np.median([loop_host_ms(r["transformer"], on_device, pooled, text, img_ids, sigmas,
                                                p.guidance_scale) for _ in range(max(s.generation_iters, 1))]))
        if s.profile and device == "cuda":  # last: CUPTI may slow the host's launches after it
            log(f"{label}: profiling {s.profile} transformer steps")
            stats["transformer"]["kernels"] = kernel_profile(calls["transformer"], s.profile, device)
        quality: dict = {}
        if ref is None:  # the reference: its own trajectory, one step at a time (the loop's own arithmetic)
            xs, vs, x = [latents], [], on_device
            for i in range(s.steps):
                nxt = step(x, i)
                vs.append((host(nxt) - host(x)) / np.float32(sigmas[i + 1] - sigmas[i]))
                x = nxt
                xs.append(host(x))
            ref = Reference(label, xs, vs, host(pooled), host(text), sigmas, images)
        else:
            per_step = []
            for i in range(s.steps):
                nxt = host(loop.denoise(r["transformer"], ref.latents[i], ref.pooled, ref.text, img_ids,
                                        ref.sigmas[i:i + 2], p.guidance_scale))
                v = (nxt - ref.latents[i]) / np.float32(ref.sigmas[i + 1] - ref.sigmas[i])
                per_step.append(rel_rms(v, ref.velocities[i]))
            quality = dict(vs=ref.label, per_step_rel_rms=per_step, image=bench.image_quality(images, ref.images))
        if lora is not None:
            log(f"{label}: LoRA rank {lora['rank']} swapped in and out")

            def generate_once():
                generate()
                return outputs[-1]

            quality["lora"], lora_images = lora_swap(pipe, lora, generate_once, ref, images)
            if ref.lora_images is None:
                ref.lora_images = lora_images
        manifest = pipe.folder.manifest
        config = manifest.get("transformer_config") or {}
        layers = [config.get("num_layers"), config.get("num_single_layers")]
        common = dict(backend=f"{backend}+kernels" if manifest["components"]["transformer"].get("attention")
                      == "ort-kernels" else backend, precision=pipe.folder.precision, label=label,
                      cuda_graph=device == "cuda", gpu_used_gib=(bench.gpu_memory_used_bytes() or 0) / 2**30 or None)
        graphs = {k: rec.get("precision") for k, rec in manifest["components"].items()}
        stage_rows(results, common, {k: v for k, v in stats.items() if k != "generation"}, layers, graphs)
        results.add(component="generation", layers=layers, **common, **stats["generation"], load_s=load_s,
                    steps=s.steps, image_std=float(np.std(images)), glue_ms_per_step=glue_per_step(stats, s.steps),
                    loop_host_ms_per_step=host_ms, loop_host_fraction=host_ms / stats["transformer"]["p50_ms"],
                    **quality)
        return ref, images
    finally:
        for runner in pipe.runners.values():
            runner.deactivate()
        del pipe
        free_memory()


def free_memory() -> None:
    gc.collect()
    if "cupy" in sys.modules:
        import cupy

        if cupy.cuda.runtime.getDeviceCount():
            cupy.get_default_memory_pool().free_all_blocks()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def torch_pipeline(ckpt: RandomCheckpoint, dtype: torch.dtype):
    """diffusers' FluxPipeline over the checkpoint's seeded modules: the weights fluxrt's graphs were exported from."""
    from fluxrt.export.quiet import quiet_hf

    with quiet_hf():
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
        from transformers import CLIPTokenizer, T5TokenizerFast

        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(ckpt.root / "scheduler"),
                            vae=ckpt.module("vae", dtype), text_encoder=ckpt.module("clip", dtype),
                            tokenizer=CLIPTokenizer.from_pretrained(ckpt.root / "tokenizer"),
                            text_encoder_2=ckpt.module("t5", dtype),
                            tokenizer_2=T5TokenizerFast.from_pretrained(ckpt.root / "tokenizer_2"),
                            transformer=ckpt.module("transformer", dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def uncompile_blocks(module: torch.nn.Module) -> None:
    """Undo ``compile_repeated_blocks`` (``nn.Module.compile`` keeps the compiled call in ``_compiled_call_impl``):
    the modes after a regional one run the blocks as they were."""
    for sub in module.modules():
        if getattr(sub, "_compiled_call_impl", None) is not None:
            sub._compiled_call_impl = None


def torchao_fp8(module: torch.nn.Module) -> dict:
    from fluxrt.bench.synthetic import torchao_fp8 as quantize

    return quantize(module)


def run_torch(modes: list[str], root: Path, s: RunSettings, device: str, latents: np.ndarray, ref: Reference | None,
              results: Results, seed: int = 0) -> None:
    from fluxrt.runtime import sampling

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    ckpt = RandomCheckpoint.open_random(root / CHECKPOINT, seed=seed, device=device)
    log(f"torch: building diffusers' FluxPipeline ({precision}) on {device}")
    pipe = torch_pipeline(ckpt, dtype)
    base = pipe.transformer
    config = base.config
    layers = [config.num_layers, config.num_single_layers]
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    with torch.inference_mode():
        clip_ids = pipe.tokenizer([s.prompt], padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids.to(device)
        t5_ids = pipe.tokenizer_2([s.prompt], padding="max_length", max_length=s.text_length, truncation=True,
                                  return_tensors="pt").input_ids.to(device)
        pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        text = pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        x0 = torch.from_numpy(latents).to(device)
        # the ids in the embeddings' dtype, as FluxPipeline passes them: a compiled transformer called with
        # other dtypes than the pipeline's would be compiled again (and time a second graph)
        img_ids = torch.from_numpy(sampling.image_ids(s.height, s.width, vae_scale)).to(device, text.dtype)
        txt_ids = torch.zeros(s.text_length, 3, device=device, dtype=text.dtype)
        guidance = torch.full([1], s.guidance, device=device, dtype=torch.float32)
        sigmas = ref.sigmas if ref is not None else None
        z = torch.from_numpy(sampling.decode_latents_scale(
            sampling.unpack_latents(latents, s.height, s.width, vae_scale), pipe.vae.config.scaling_factor,
            pipe.vae.config.shift_factor)).to(device, dtype)

    def velocity(x, sigma, pooled=pooled, text=text):
        # the timestep as FluxPipeline makes it: the scheduler's t = 1000 sigma (float32) in the latents' dtype,
        # over 1000
        t = torch.full([1], float(np.float32(sigma) * np.float32(1000)), device=device, dtype=torch.float32)
        return pipe.transformer(hidden_states=x.to(dtype), timestep=t.to(dtype) / 1000,
                                guidance=guidance, pooled_projections=pooled.to(dtype),
                                encoder_hidden_states=text.to(dtype), txt_ids=txt_ids, img_ids=img_ids,
                                return_dict=False)[0]

    calls = {"clip": lambda: pipe.text_encoder(clip_ids, output_hidden_states=False),
             "t5": lambda: pipe.text_encoder_2(t5_ids, output_hidden_states=False),
             "transformer": lambda: velocity(x0, 1.0),
             "vae_decoder": lambda: pipe.vae.decode(z, return_dict=False)}
    eager_images = None
    for mode in modes:
        extra: dict = {}
        torch._dynamo.reset()
        if mode == "eager":
            pipe.transformer = base
        elif mode == "compile":
            pipe.transformer = torch.compile(base)
        elif mode == "compile-emulate":
            pipe.transformer = torch.compile(base, options={"emulate_precision_casts": True})
        elif mode == "compile-regional":
            base.compile_repeated_blocks()  # in place, undone after this mode (uncompile_blocks)
            pipe.transformer = base
        else:
            extra = torchao_fp8(base)  # in place: the last mode
            if mode == "torchao-fp8-regional":
                base.compile_repeated_blocks()
                pipe.transformer = base
            else:
                pipe.transformer = torch.compile(base)
        outputs = []

        def generate():
            outputs.append(pipe(prompt=[s.prompt], height=s.height, width=s.width, num_inference_steps=s.steps,
                                guidance_scale=s.guidance, max_sequence_length=s.text_length, latents=x0,
                                output_type="np").images)
            del outputs[:-1]

        log(f"torch {mode}: first generation")
        with torch.inference_mode():
            start = time.perf_counter()
            generate()
            bench.device_sync()
            first = time.perf_counter() - start
            stats = {}
            for name, fn in calls.items():
                log(f"torch {mode}: {name}")
                stats[name] = bench.summarize(bench.time_call(fn, warmup=s.warmup, iters=s.iters))
            log(f"torch {mode}: generation ({s.steps} steps)")
            stats["generation"] = bench.summarize(bench.time_call(generate, warmup=max(s.generation_warmup - 1, 0),
                                                                  iters=s.generation_iters))
            if s.profile and device == "cuda":  # after the timings (see kernel_profile)
                log(f"torch {mode}: profiling {s.profile} transformer steps")
                stats["transformer"]["kernels"] = kernel_profile(calls["transformer"], s.profile, device)
            images = outputs[-1]
            quality: dict = {}
            if ref is not None:
                per_step = [rel_rms(host(velocity(torch.from_numpy(ref.latents[i]).to(device), ref.sigmas[i],
                                                  torch.from_numpy(ref.pooled).to(device),
                                                  torch.from_numpy(ref.text).to(device))), ref.velocities[i])
                            for i in range(s.steps)]
                quality = dict(vs=ref.label, per_step_rel_rms=per_step, image=bench.image_quality(images, ref.images))
            if eager_images is not None:
                quality["image_vs_torch_eager"] = bench.image_quality(images, eager_images)
        if mode == "eager":
            eager_images = images
        if mode == "compile-regional":
            uncompile_blocks(base)
        common = dict(backend=f"torch-{mode}", precision="fp8" if mode in TORCHAO_MODES else precision,
                      label=f"torch {mode}", transformer_only=mode != "eager",
                      gpu_peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None)
        stage_rows(results, common, {k: v for k, v in stats.items() if k != "generation"}, layers)
        results.add(component="generation", layers=layers, **common, **stats["generation"], first_call_s=first,
                    steps=s.steps, image_std=float(np.std(images)), glue_ms_per_step=glue_per_step(stats, s.steps), **quality, **extra)
    del pipe, base
    torch._dynamo.reset()
    free_memory()


def export_records(root: Path, precisions: list[str]) -> dict:
    """Per export folder, per graph: the export's seconds, peak host memory and weights (its manifest's record);
    for an FP8 folder, the calibration record's seconds."""
    out = {}
    for precision in precisions:
        folder = root / f"onnx-{precision}"
        manifest = json.loads((folder / "manifest.json").read_text())
        graphs = {}
        for name, record in manifest["components"].items():
            entry = {k: record.get(k) for k in ("precision", "export_seconds", "peak_rss_bytes", "weights_bytes")}
            if "quantization" in record:
                calibration = json.loads((folder / record["quantization"]["record"]).read_text())
                entry.update(quantize_seconds=calibration["seconds"], calibration=calibration["calibration"],
                             quantized_linears=len(calibration["quantized"]))
            graphs[name] = entry
        out[precision] = graphs
    return out


def run(root: str | Path, out: str | Path, precisions: list[str], torch_modes: list[str], s: RunSettings,
        device: str = "cuda", seed: int = 0) -> dict:
    root, out = Path(root), Path(out)
    check_run(root, out, precisions, torch_modes, device)
    results = Results(out / "results.json", dict(asdict(s), precisions=precisions, torch=torch_modes, device=device,
                                                 seed=seed))
    results.data["exports"] = export_records(root, precisions)
    order = sorted(precisions, key=lambda p: p != ("bf16" if "bf16" in precisions else precisions[0]))
    ref, latents, sheet = None, None, {}
    lora = random_lora(root, root / f"lora-r{s.lora_rank}.safetensors", s.lora_rank) if s.lora_rank else None
    for precision in order:
        ref, images = run_fluxrt(f"fluxrt {precision}", root / f"onnx-{precision}", s, device, ref, results, lora)
        sheet[f"fluxrt {precision}"] = images
    if torch_modes:
        from fluxrt.runtime import sampling

        factor = json.loads((root / CHECKPOINT / "vae" / "config.json").read_text())["block_out_channels"]
        latents = ref.latents[0] if ref is not None else sampling.pack_latents(sampling.initial_noise(
            s.seed, 1, s.height, s.width, 16, 2 ** (len(factor) - 1)))
        run_torch(torch_modes, root, s, device, latents, ref, results, seed)
    report(out / "results.json", out, sheet)
    return results.data


def check_run(root: Path, out: Path, precisions: list[str], torch_modes: list[str], device: str) -> None:
    """Every flag and folder checked before anything is loaded."""
    bad = [p for p in precisions if p not in FLUXRT_PRECISIONS]
    if bad or len(set(precisions)) != len(precisions):
        raise InvalidInputError(f"--precisions {','.join(precisions)}: each once, from {list(FLUXRT_PRECISIONS)}")
    bad = [m for m in torch_modes if m not in TORCH_MODES]
    if bad:
        raise InvalidInputError(f"--torch {','.join(torch_modes)}: each must be one of {list(TORCH_MODES)}")
    if not precisions and not torch_modes:
        raise InvalidInputError("nothing to run: give --precisions and/or --torch")
    torchao = [m for m in torch_modes if m in TORCHAO_MODES]
    if torchao and (device != "cuda" or len(torchao) > 1 or torch_modes[-1] != torchao[0]):
        raise InvalidInputError(f"--torch {torchao[0]} runs on --device cuda, alone of {list(TORCHAO_MODES)} and last "
                                "(it quantizes the transformer "
                                "in place)")
    if device not in ("cuda", "cpu"):
        raise InvalidInputError(f"--device {device!r} is not one of ['cuda', 'cpu']")
    if not (root / CHECKPOINT / "model_index.json").is_file():
        raise InvalidInputError(f"{root / CHECKPOINT} is not a prepared checkpoint (run `prepare {root}` first)")
    for precision in precisions:
        if not (root / f"onnx-{precision}" / "manifest.json").is_file():
            raise InvalidInputError(f"--precisions {precision}: {root / f'onnx-{precision}'} holds no export (run "
                                    f"`export {root} --precision {precision}`, or fluxrt quantize for fp8)")
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} is not a folder")


# ---- report -----------------------------------------------------------------------------------------

def report(results_file: Path, out: Path, images: dict | None = None) -> None:
    """results.md (stage table, quality, exports) and stages.png from results.json; images.png from ``images``."""
    data = json.loads(Path(results_file).read_text())
    rows = [r for r in data["rows"] if "p50_ms" in r]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    compile_gen = next((r["p50_ms"] for r in rows if r["label"] == "torch compile" and r["component"] == "generation"),
                       None)
    compile_step = next((r["p50_ms"] for r in rows if r["label"] == "torch compile" and r["component"] == "transformer"),
                        None)
    table = []
    for label in labels:
        by = {r["component"]: r for r in rows if r["label"] == label}
        gen = by.get("generation", {})
        row = {"config": label}
        for c in (*STAGES, "generation"):
            if c in by:
                row[c] = f"{by[c]['p50_ms']:.1f} / {by[c]['p90_ms']:.1f} / {by[c]['p99_ms']:.1f}"
        if compile_step and "transformer" in by:
            row["step_vs_compile"] = f"{by['transformer']['p50_ms'] / compile_step:.3f}x"
        if compile_gen and gen:
            row["gen_vs_compile"] = f"{gen['p50_ms'] / compile_gen:.3f}x"
        if gen.get("glue_ms_per_step") is not None:
            row["glue"] = f"{gen['glue_ms_per_step']:.2f}"
        if gen.get("loop_host_ms_per_step") is not None:
            row["loop_host"] = f"{gen['loop_host_ms_per_step']:.3f} ({100 * gen['loop_host_fraction']:.2f}%)"
        table.append(row)
    quality = []
    for r in rows:
        if r["component"] != "generation" or "image" not in r:
            continue
        steps = r["per_step_rel_rms"]
        quality.append({"config": r["label"], "vs": r["vs"], "step_rms_first": f"{steps[0]:.3g}",
                        "step_rms_median": f"{float(np.median(steps)):.3g}", "step_rms_max": f"{max(steps):.3g}",
                        "max_abs": f"{r['image']['max_abs']:.4f}", "mean_abs": f"{r['image']['mean_abs']:.5f}",
                        "psnr": f"{r['image']['psnr_db']:.2f}", "ssim": f"{r['image'].get('ssim', float('nan')):.4f}"})
    loras = []
    for r in rows:
        lo = r.get("lora") if r["component"] == "generation" else None
        if lo:
            loras.append({"config": r["label"], "rank": lo["rank"], "targets": lo["targets"],
                          "load_s": f"{lo['load_s']:.2f}", "first_s": f"{lo['first_generation_s']:.2f}",
                          "gen_s": f"{lo['generation_s']:.3f}", "unload_s": f"{lo['unload_s']:.2f}",
                          "restored": "yes" if lo["base_restored"] else "NO",
                          "vs_base": f"{lo['image_vs_base']['psnr_db']:.2f}",
                          "vs_ref": f"{lo['image']['psnr_db']:.2f} ({lo['vs']})" if "image" in lo else ""})
    kernels, top = [], []
    for r in rows:
        k = r.get("kernels")
        if r["component"] != "transformer" or not k:
            continue
        kernels.append({"config": r["label"], "wall": f"{r['p50_ms']:.1f}", "gpu": f"{k['gpu_ms']:.1f}",
                        "launches": f"{k['launches']:.0f}",
                        **{c: f"{ms:.2f}" for c, ms in k["by_class_ms"].items()}})
        top += [{"config": r["label"], "kernel": t["name"][:100], "class": t["class"], "ms": f"{t['ms']:.2f}",
                 "calls": f"{t['calls']:.0f}"} for t in k["top_kernels"][:12]]
    classes = list(dict.fromkeys(c for row in kernels for c in row if c not in ("config", "wall", "gpu", "launches")))
    exports = []
    for precision, graphs in data.get("exports", {}).items():
        for name, e in graphs.items():
            exports.append({"folder": f"onnx-{precision}", "graph": name, "precision": e.get("precision"),
                            "seconds": e.get("export_seconds"), "peak_rss_gib": float(f"{e['peak_rss_bytes'] / 2**30:.4g}")
                            if e.get("peak_rss_bytes") else "",
                            "weights_gib": float(f"{e['weights_bytes'] / 2**30:.4g}") if e.get("weights_bytes") else "",
                            "quantize_s": (e.get("quantize_seconds") or {}).get("total", "")})
    machine = data.get("machine", {})
    s = data["settings"]
    text = [f"# FLUX.1-dev end to end: {machine.get('gpu', 'CPU')}\n",
            f"{s['height']}x{s['width']}, {s['text_length']} text tokens, batch 1, {s['steps']} steps, guidance "
            f"{s['guidance']}; stages p50 / p90 / p99 ms of {s['iters']} calls after {s['warmup']}, the generation of "
            f"{s['generation_iters']} after {s['generation_warmup']}. Machine: {json.dumps(machine)}\n",
            bench.markdown_table(table, [("config", "configuration"), ("clip", "CLIP"), ("t5", "T5"),
                                         ("transformer", "transformer step"), ("vae_decoder", "VAE decode"),
                                         ("generation", "generation"), ("step_vs_compile", "step vs torch.compile"),
                                         ("gen_vs_compile", "generation vs torch.compile"),
                                         ("glue", "glue ms/step"),
                                         ("loop_host", "loop host ms/step (of the step)")]),
            "\n## Quality against the reference (random weights)\n",
            bench.markdown_table(quality, [("config", "configuration"), ("vs", "against"),
                                           ("step_rms_first", "velocity rel. RMS, step 1"),
                                           ("step_rms_median", "median step"), ("step_rms_max", "worst step"),
                                           ("max_abs", "image max |diff|"), ("mean_abs", "mean |diff|"),
                                           ("psnr", "PSNR dB"), ("ssim", "SSIM")]),
            *(["\n## LoRA swapped in and out of the loaded pipeline (seconds; image PSNR dB)\n",
               bench.markdown_table(loras, [("config", "configuration"), ("rank", "rank"), ("targets", "linears"),
                                            ("load_s", "load"), ("first_s", "first generation"),
                                            ("gen_s", "next generation"), ("unload_s", "unload"),
                                            ("restored", "base image after unload"),
                                            ("vs_base", "LoRA image vs its base image"),
                                            ("vs_ref", "vs the reference's LoRA image")])]
              if loras else []),
            *(["\n## One transformer step's GPU kernel time by kind (CUPTI, ms per step)\n",
               bench.markdown_table(kernels, [("config", "configuration"), ("wall", "p50 wall"), ("gpu", "kernels"),
                                              ("launches", "launches")] + [(c, c) for c in classes]),
               "\nThe largest kernels per configuration:\n",
               bench.markdown_table(top, [(k, k) for k in ("config", "kernel", "class", "ms", "calls")])]
              if kernels else []),
            "\n## Exports\n",
            bench.markdown_table(exports, [(k, k) for k in ("folder", "graph", "precision", "seconds", "peak_rss_gib",
                                                            "weights_gib", "quantize_s")]),
            "\n## Method\n", __doc__.strip() + "\n"]
    atomic_write_text(out / "results.md", "\n".join(text))
    chart = [{"config": r["label"], "stage": r["component"], "ms": r["p50_ms"]} for r in rows
             if r["component"] in ("transformer", "generation")]
    chart = [dict(c, ms=c["ms"] / 1000 if c["stage"] == "generation" else c["ms"],
                  stage="generation (s)" if c["stage"] == "generation" else "transformer step (ms)") for c in chart]
    bench.bar_chart(chart, "config", "stage", "ms", f"FLUX.1-dev, {machine.get('gpu', 'CPU')}: p50", out / "stages.png")
    if images:
        contact_sheet(images, out / "images.png")


def contact_sheet(images: dict, path: Path, size: int = 256) -> None:
    from PIL import Image, ImageDraw

    from fluxrt.files import atomic_path

    sheet = Image.new("RGB", (size * len(images), size + 16), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, imgs) in enumerate(images.items()):
        img = Image.fromarray((np.clip(imgs[0], 0, 1) * 255).round().astype(np.uint8)).resize((size, size))
        sheet.paste(img, (i * size, 16))
        draw.text((i * size + 4, 2), label, fill="black")
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


# ---- command line -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fluxrt.bench.full", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("prepare", help="write ROOT/checkpoint (configs, tokenizers, scheduler; no weights)")
    a.add_argument("root", type=Path)
    a.add_argument("--model", default="flux-dev", choices=("flux-dev", "tiny"))
    e = sub.add_parser("export", help="fluxrt's exporter on ROOT/checkpoint -> ROOT/onnx-PRECISION")
    e.add_argument("root", type=Path)
    e.add_argument("--precision", required=True, choices=("fp32", "fp16", "bf16"))
    e.add_argument("--components", default="clip,t5,transformer,vae")
    e.add_argument("--attention", default="ort-kernels", choices=("portable", "ort", "ort-kernels"))
    e.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where the seeded modules are made")
    e.add_argument("--weights-seed", type=int, default=0, help="the seed of the random weights")
    e.add_argument("--others-from", metavar="PRECISION", help="link the graphs --components leaves out from the "
                                                             "export ROOT/onnx-PRECISION (e.g. an fp16 transformer "
                                                             "beside bf16's text encoders and VAE)")
    r = sub.add_parser("run", help="time and compare the configurations (see the module doc)")
    r.add_argument("root", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--precisions", default="fp16,bf16,fp8", help="fluxrt export folders ROOT/onnx-P to run")
    r.add_argument("--torch", default="eager,compile,torchao-fp8", help="diffusers' pipeline modes, '' for none")
    r.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    r.add_argument("--weights-seed", type=int, default=0, help="the random weights' seed (as exported)")
    for field, default in asdict(RunSettings()).items():
        r.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    rep = sub.add_parser("report", help="results.md and stages.png from a results.json")
    rep.add_argument("results", type=Path)
    args = p.parse_args(argv)
    try:
        if args.command == "prepare":
            print(prepare(args.root, args.model))
        elif args.command == "export":
            export(args.root, args.precision, tuple(args.components.split(",")), args.attention, args.device,
                   args.weights_seed, args.others_from)
        elif args.command == "run":
            settings = RunSettings(**{f: getattr(args, f) for f in asdict(RunSettings())})
            run(args.root, args.out, [x for x in args.precisions.split(",") if x],
                [x for x in args.torch.split(",") if x], settings, args.device, args.weights_seed)
        else:
            report(args.results, args.results.parent)
    except FluxRTError as err:
        print(f"python -m fluxrt.bench.full {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
