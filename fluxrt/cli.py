"""The ``fluxrt`` command line: one console script, one subcommand per pipeline stage, and the one
place that wires the stages together (the torch reference backend into the runtime's pipeline, the
export folder into the engine builder).

Heavy libraries are imported inside each subcommand, so ``fluxrt generate`` never loads torch.
Errors fluxrt raises on purpose become one line on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from fluxrt.components import ATTENTION_MODES, VARIANT_DEFAULTS
from fluxrt.errors import FluxRTError
from fluxrt.files import UMASK

BACKEND_CHOICES = ("ort-cpu", "ort-cuda", "trt", "torch")  # fluxrt.runtime.backends.BACKENDS and torch


def cmd_tiny_model(args: argparse.Namespace) -> None:
    from fluxrt.export.tiny import write_tiny_checkpoint

    if args.trained and args.seed is not None:
        raise UsageError("--seed draws random weights; --trained writes the shipped trained model: give one")
    seed = 0 if args.seed is None else args.seed
    path = write_tiny_checkpoint(args.dir, variant=args.variant, seed=seed, trained=args.trained)
    what = "trained" if args.trained else f"seed {seed}"
    print(f"wrote tiny FLUX.1-{args.variant} checkpoint ({what}) to {path}")


def cmd_train_tiny(args: argparse.Namespace) -> None:
    from fluxrt.train.tiny import TrainSettings, train_tiny

    if args.steps_scale is not None and not 0 < args.steps_scale <= 100:
        raise UsageError(f"--steps-scale must be in (0, 100], got {args.steps_scale}")
    if args.device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA device; use --device cpu")
    settings = TrainSettings(seed=args.seed)
    if args.steps_scale is not None:
        settings = settings.scaled(args.steps_scale)
    start = time.perf_counter()
    path = train_tiny(args.out, args.device, settings, say=lambda line: print(f"fluxrt train-tiny: {line}",
                                                                             file=sys.stderr, flush=True))
    print(f"wrote trained tiny FLUX.1-dev checkpoint to {path} in {time.perf_counter() - start:.0f} s")


def cmd_export(args: argparse.Namespace) -> None:
    from fluxrt.export.checkpoint import Checkpoint
    from fluxrt.export.onnx_export import ExportRequest, export_checkpoint

    loras = tuple((str(path), scale) for path, scale in map(parse_lora, args.lora or ()))
    try:
        request = ExportRequest(components=tuple(c.strip() for c in args.components.split(",") if c.strip()),
                                precision=args.precision, attention=args.attention, loras=loras)
    except ValueError as e:
        raise UsageError(str(e)) from None
    ckpt = Checkpoint.open(args.checkpoint, transformer_file=args.transformer, vae_file=args.vae)
    manifest = export_checkpoint(ckpt, args.out, request)
    total = sum(r["export_seconds"] for n, r in manifest["components"].items() if n in request.graphs)
    merged = f", {len(loras)} LoRA file(s) merged into the transformer" if loras else ""
    print(f"exported {', '.join(request.graphs)} ({manifest['variant']}, {args.precision}{merged}) to {args.out} "
          f"in {total:.1f}s")


def parse_lora(text: str) -> tuple[Path, float]:
    """``--lora FILE[:SCALE]`` -> (file, scale), the scale 1 when not given."""
    import math

    path, colon, scale = text.rpartition(":")
    if not colon or Path(text).is_file():  # a file whose name has a colon in it
        path, scale = text, "1"
    try:
        value = float(scale)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UsageError(f"--lora {text!r}: SCALE must be a finite number (FILE[:SCALE]), got {scale!r}")
    if not Path(path).is_file():
        raise UsageError(f"--lora {text!r}: LoRA file {path} does not exist")
    return Path(path), value


def stage_runners(path: Path, backend: str | None, cuda_graph: bool, expect: str):
    """An export or engine folder and one runner per stage on ``backend``, each verified once and none
    loaded yet (``--backend torch``: the export side's reference runners, injected into the runtime)."""
    from fluxrt.artifacts import open_folder
    from fluxrt.runtime.backends import BackendOptions, make_runners

    folder = open_folder(path)
    flag = "--engines" if expect == "engines" else "--onnx"
    if folder.kind != expect:
        other = "--onnx" if flag == "--engines" else "--engines"
        raise UsageError(f"{flag} {path} is an {folder.kind} folder, not an {expect} folder: pass it with {other}")
    if backend != "torch":
        return folder, make_runners(folder, backend, BackendOptions(cuda_graph=cuda_graph))
    if folder.kind != "export":
        raise UsageError(f"--backend torch runs the checkpoint an export folder was made from; {path} is an "
                         f"engine folder")
    if cuda_graph:
        raise UsageError("--cuda-graph replays the ort-cuda transformer; --backend torch has none")
    from fluxrt.export.torch_runner import torch_runners

    return folder, torch_runners(folder)


def cmd_generate(args: argparse.Namespace) -> None:
    from fluxrt.artifacts import check_envelope
    from fluxrt.files import sha256_file
    from fluxrt.runtime import FluxPipeline, memory
    from fluxrt.runtime.params import DEFAULT_STRENGTH, GenerationParams, InitImage
    from fluxrt.runtime.pipeline import progress_bar
    from fluxrt.runtime.png import generation_settings, png_info

    if args.out.suffix.lower() != ".png":  # reported before any work
        raise UsageError(f"--out must name a .png file, got {args.out}")
    if args.strength is not None and args.image is None:
        raise UsageError("--strength sets how much of --image is redrawn: it needs --image FILE")
    check_text("--prompt", args.prompt)
    loras = [parse_lora(text) for text in args.lora or ()]
    image = height = width = None
    if args.image is not None:
        from PIL import Image

        try:
            with Image.open(args.image) as file:
                pixels = file.convert("RGB")
        except OSError as e:  # missing, unreadable, or not an image PIL can decode
            raise UsageError(f"--image {args.image} cannot be read as an image (PNG or JPEG): "
                             f"{e.strerror or e}") from None
        image = InitImage.from_input(pixels, DEFAULT_STRENGTH if args.strength is None else args.strength)
        height = image.height if args.height is None else args.height
        width = image.width if args.width is None else args.width
        if (height, width) != (image.height, image.width):
            raise UsageError(f"--image {args.image} is {image.width} pixels wide and {image.height} high, but "
                             f"--width {width} --height {height} ask for another size: fluxrt does not resize; resize "
                             f"the image or leave --height and --width out to take its size")
    folder, runners = stage_runners(args.engines or args.onnx, args.backend, args.cuda_graph,
                                    "engines" if args.engines else "export")
    if image is not None:
        multiple = 2 * folder.dims.vae_scale_factor
        if image.height % multiple or image.width % multiple:
            raise UsageError(f"--image {args.image} is {image.width} pixels wide and {image.height} high; its "
                             f"sides must be multiples of {multiple} pixels: crop or resize it")
    # every argument, and the engines' envelope, checked before any graph or plan is loaded
    p = GenerationParams.resolve(folder.dims, args.prompt, args.height if image is None else height,
                                 args.width if image is None else width, args.steps, args.guidance,
                                 args.max_sequence_length, args.num_images, args.seed)
    if folder.kind == "engines":
        check_envelope(folder.envelope, p.batch, p.height, p.width, p.max_sequence_length)
    if image is not None:
        from fluxrt.runtime.backends import DEFAULT_BACKEND, BackendOptions, check_optional, make_runner

        image.check(p)
        check_optional(folder, "vae_encoder")
        if args.backend == "torch":
            from fluxrt.export.torch_runner import torch_runners

            runners.update(torch_runners(folder, ("vae_encoder",)))
        else:
            runners["vae_encoder"] = make_runner(folder, "vae_encoder", args.backend or DEFAULT_BACKEND[folder.kind],
                                                 BackendOptions(cuda_graph=args.cuda_graph))
    memory.check(folder, p, {name: r.device for name, r in runners.items()},  # before the outputs are listed
                 0 if image is None else image.count)
    paths = output_paths(args.out, p.batch)
    check_writable(paths)
    pipe = FluxPipeline(folder, runners, loras)
    images = pipe.postprocess(pipe.generate(p, callback=progress_bar("fluxrt generate:"), image=image), "pil")
    settings = generation_settings(pipe, p, args.prompt, str(args.engines or args.onnx))
    if image is not None:  # the array's sha256 (as the API records it) and the file's
        settings.update(image.to_json(), image=str(args.image), image_file_sha256=sha256_file(args.image))
    infos = [png_info(settings, i) for i in range(len(images))]
    write_pngs(images, paths, infos)
    for path in paths:
        print(f"wrote {path}")


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from fluxrt.serve.server import read_api_key, serve
        from fluxrt.serve.service import Service, ServeSettings, load_pipeline
    except ImportError as e:
        raise UsageError(f"fluxrt serve needs the serve extra (pip install 'fluxrt[serve]'): {e}") from None
    path = args.engines or args.onnx
    if args.cuda_graph and args.backend != "ort-cuda":
        raise UsageError(f"--cuda-graph replays the ort-cuda transformer; --backend is {args.backend or 'the default'}")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    try:
        settings = ServeSettings(max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                                 queue_size=args.queue_size, timeout_s=args.timeout_s, max_side=args.max_side,
                                 log_prompts=args.log_prompts, png_compress_level=args.png_compress_level)
    except ValueError as e:
        raise UsageError(flag_names("serve", str(e))) from None
    api_key = read_api_key(args.api_key_file, args.host)
    loras = [parse_lora(text) for text in args.lora or ()]
    choices = list(args.lora_choice or ())
    for f in choices:
        if not f.is_file():
            raise UsageError(f"--lora-choice {f}: LoRA file does not exist")
    from fluxrt.serve.service import lora_names

    lora_names(choices)  # distinct names, checked before anything loads
    if args.ray:
        from fluxrt.serve.ray_app import run_ray

        run_ray(path, args.backend, args.cuda_graph, loras, settings, args.host, args.port, api_key, args.replicas,
                choices)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(0)  # shut down: Ray's exit hooks (ray.shutdown again, its signal handlers) have nothing left to do
    folder_kind = "engines" if args.engines else "export"
    from fluxrt.artifacts import open_folder

    if open_folder(path).kind != folder_kind:  # the folder is checked before the server listens
        raise UsageError(f"--{'engines' if args.engines else 'onnx'} {path} is not an {folder_kind} folder")
    service = Service(load_pipeline(path, args.backend, args.cuda_graph, loras), str(path), settings, choices)
    code = serve(service, args.host, args.port, api_key)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)  # the batcher's thread may be inside a backend's call: leave without running finalizers


def parse_range(text: str, what: str) -> tuple[int, int, int]:
    """``"512,1024,1536"`` -> (512, 1024, 1536); one number means min = opt = max."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--{what} must be MIN,OPT,MAX integers, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise UsageError(f"--{what} must be MIN,OPT,MAX integers, got {text!r}")
    return values


def calibration(args: argparse.Namespace):
    """The calibration recipe (quick by default, ``--full-calibration`` for the stated one) with the
    ``--calibration-*`` flags given on top."""
    from dataclasses import replace

    from fluxrt.engines.fp8 import FULL_CALIBRATION, QUICK_CALIBRATION

    given = dict(num_prompts=args.calibration_prompts, num_inference_steps=args.calibration_steps,
                 height=args.calibration_size, width=args.calibration_size,
                 max_sequence_length=args.calibration_text_length, backend=args.calibration_backend,
                 fp8_attention=args.fp8_attention or None,
                 fused_products=False if args.no_fused_products else None,
                 fast_accumulation=args.fp8_fast_accumulation or None)
    base = FULL_CALIBRATION if args.full_calibration else QUICK_CALIBRATION
    try:
        return replace(base, **{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        raise UsageError(str(e)) from None


def fp8_settings(args: argparse.Namespace):
    return calibration(args) if args.precision == "fp8" else None


def cmd_quantize(args: argparse.Namespace) -> None:
    from fluxrt.engines.quantize import quantize_export

    start = time.perf_counter()
    manifest = quantize_export(args.onnx_dir, args.out, calibration(args))
    q = manifest["components"]["transformer"]["quantization"]
    print(f"wrote the FP8 export of {args.onnx_dir} ({manifest['base_precision']}, {q['quantized']} linears in FP8, "
          f"{q['excluded']} kept) to {args.out} in {time.perf_counter() - start:.1f}s")


def add_calibration_flags(p: argparse.ArgumentParser, when: str) -> None:
    p.add_argument("--full-calibration", action="store_true",
                   help=f"{when}calibrate on the stated recipe: 64 bundled prompts, the variant's steps and text "
                        f"length, 1024 px (default: 8 prompts, 4 steps, 512 px, 128 tokens: minutes on the tiny "
                        f"model on a CPU)")
    p.add_argument("--calibration-prompts", type=int, help=f"{when}bundled prompts to calibrate on, from 1 to "
                                                           f"the 72 of engines/calibration_prompts.txt")
    p.add_argument("--calibration-steps", type=int, help=f"{when}sampling steps per prompt, >= 1")
    p.add_argument("--calibration-size", type=int, help=f"{when}image side in pixels, a positive multiple of 16")
    p.add_argument("--calibration-text-length", type=int, help=f"{when}T5 tokens, 1..512 dev, 1..256 schnell")
    p.add_argument("--calibration-backend", choices=("ort-cpu", "ort-cuda"), help=f"{when}the runtime backend "
                                                                                   f"that samples (default ort-cpu)")
    p.add_argument("--fp8-attention", action="store_true",
                   help=f"{when}attention in FP8 too (cuDNN's FP8 attention on Hopper or newer; its q, k, v and "
                        f"output calibrated like the linears' inputs); for --attention ort-kernels exports")
    p.add_argument("--no-fused-products", action="store_true",
                   help=f"{when}one FP8 matrix product per linear, rather than one for the linears that read the same "
                        f"input (q, k, v and the MLP of a single block); for comparing, ort-kernels exports")
    p.add_argument("--fp8-fast-accumulation", action="store_true",
                   help=f"{when}cuBLASLt's FP8 fast accumulation in every FP8 product (the tensor cores' accumulator "
                        f"throughout, never promoted to float32: faster on Hopper, less exact; what torchao's FP8 "
                        f"inference uses); for --attention ort-kernels exports")


def cmd_ort_ops(args: argparse.Namespace) -> None:
    from fluxrt.runtime import ort_ops
    from fluxrt.runtime.ort_ops.build import build

    archs = tuple(a for a in args.cuda_archs.replace(",", ";").split(";") if a) if args.cuda_archs else None
    path = build(args.out, cuda=False if args.cpu_only else None, archs=archs, include=args.ort_include)
    devices = sorted(ort_ops.library_devices(path))
    print(f"built fluxrt's ONNX Runtime kernels ({', '.join(devices)}) to {path}")
    if args.out is not None:
        print(f"the runtime loads it from ${ort_ops.ENV_LIBRARY}: export {ort_ops.ENV_LIBRARY}={path}")


def cmd_build(args: argparse.Namespace) -> None:
    from fluxrt.components import STAGES, ShapeEnvelope
    from fluxrt.engines.folder import BuildSettings, build_folder, open_export
    from fluxrt.trt import import_trt

    export = open_export(args.onnx_dir)
    max_text = VARIANT_DEFAULTS[export.variant]["max_sequence_length"]
    text = parse_range(args.text_length, "text-length") if args.text_length else (1, max_text, max_text)
    components = tuple(c.strip() for c in args.components.split(",")) if args.components else STAGES
    try:
        envelope = ShapeEnvelope(batch=parse_range(args.batch, "batch"), text_length=text,
                                 image_side=parse_range(args.image_side, "image-side"))
        settings = BuildSettings(
            precision=args.precision, envelope=envelope, optimization_level=args.optimization_level,
            workspace_bytes=int(args.workspace_gib * 2**30) if args.workspace_gib else None,
            timing_cache=str(args.timing_cache) if args.timing_cache else None,
            compute_capabilities=tuple(args.compute_capability.split(",")) if args.compute_capability else None,
            components=components, fp8=fp8_settings(args), refittable=args.refittable)
    except ValueError as e:
        raise UsageError(str(e)) from None
    trt = import_trt(args.library)
    start = time.perf_counter()
    actions = build_folder(export.root, args.out, settings, trt_module=trt)
    summary = ", ".join(f"{k} {v}" for k, v in actions.items())
    print(f"{args.out}: {summary} ({args.precision}, {trt.__name__} {trt.__version__}) in "
          f"{time.perf_counter() - start:.1f}s")


def cmd_bench(args: argparse.Namespace) -> None:
    from fluxrt.bench.pipelines import BenchConfig, BenchSettings, bench_pipelines

    from fluxrt.bench.pipelines import BENCH_BACKENDS

    configs = []
    for item in args.run:
        label, sep, rest = item.partition("=")
        path, _, backend = rest.rpartition(":")
        if not sep or not label or not path or not backend:
            raise UsageError(f"--run must be LABEL=FOLDER:BACKEND (e.g. fp16=out/onnx-fp16:ort-cuda), got {item!r}")
        if backend not in BENCH_BACKENDS:
            raise UsageError(f"--run {item!r}: backend {backend!r} is not one of {list(BENCH_BACKENDS)}")
        if not Path(path).is_dir():
            raise UsageError(f"--run {item!r}: {path} is not a folder (an export or engine folder)")
        # "ort-cuda+graph": ort-cuda with the transformer replayed from a CUDA graph
        configs.append(BenchConfig(label, Path(path), backend))
    if len({c.label for c in configs}) != len(configs):
        raise UsageError(f"--run labels must be unique, got {[c.label for c in configs]}")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is not a folder; name a folder for bench.json, bench.md and bench.png")
    check_writable([args.out / "bench.json"])
    check_text("--prompt", args.prompt)
    try:
        settings = BenchSettings(prompt=args.prompt, height=args.height, width=args.width, steps=args.steps,
                                 text_length=args.text_length, batch=args.batch, seed=args.seed,
                                 warmup=args.warmup, iters=args.iters)
    except ValueError as e:
        raise UsageError(str(e)) from None
    report = bench_pipelines(configs, settings, args.out)
    for r in report["runs"]:
        stages = ", ".join(f"{k} {v['p50_ms']:.1f}" for k, v in r["stages"].items())
        print(f"{r['label']}: p50 ms {stages}; PSNR vs {r['quality_vs']} {r['quality']['psnr_db']:.1f} dB")
    print(f"wrote {args.out / 'bench.json'}, bench.md, bench.png")


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from fluxrt.bench.serve import ServeBenchSettings, bench_serve, bench_serve_ray, summary_text

    try:
        import fastapi  # noqa: F401 - the server needs the serve extra
    except ImportError as e:
        raise UsageError(f"fluxrt bench-serve runs fluxrt serve, which needs the serve extra: {e}") from None
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is not a folder; name a folder for bench-serve.json and bench-serve.md")
    check_writable([args.out / "bench-serve.json"])
    try:
        width, height = (int(v) for v in args.size.split("x"))
        concurrency = tuple(int(v) for v in args.concurrency.split(","))
        replicas = tuple(int(v) for v in args.ray_replicas.split(",")) if args.ray_replicas else None
    except ValueError:
        raise UsageError(f"--size must be WIDTHxHEIGHT, --concurrency N[,N...] and --ray-replicas N[,N...], got "
                         f"{args.size!r}, {args.concurrency!r} and {args.ray_replicas!r}") from None
    if replicas is not None and any(n < 1 for n in replicas):
        raise UsageError(f"--ray-replicas must be integers >= 1, got {args.ray_replicas!r}")
    try:
        settings = ServeBenchSettings(width=width, height=height, steps=args.steps, requests=args.requests,
                                      concurrency=concurrency, max_batch=args.max_batch,
                                      batch_wait_ms=args.batch_wait_ms, warmup=args.warmup)
    except ValueError as e:
        raise UsageError(flag_names("bench-serve", str(e))) from None
    kind = "engines" if args.engines else "onnx"
    folder_kind = "engines" if args.engines else "export"
    from fluxrt.artifacts import open_folder

    folder = args.engines or args.onnx
    if open_folder(folder).kind != folder_kind:
        raise UsageError(f"--{kind} {folder} is not an {folder_kind} folder")
    say = lambda line: print(f"fluxrt bench-serve: {line}", file=sys.stderr)  # noqa: E731
    if replicas is not None:
        try:
            import ray.serve  # noqa: F401
        except ImportError as e:
            raise UsageError(f"--ray-replicas runs fluxrt serve --ray, which needs the ray extra: {e}") from None
        report = bench_serve_ray(folder, kind, args.backend, args.cuda_graph, settings, replicas, args.out, say=say)
    else:
        report = bench_serve(folder, kind, args.backend, args.cuda_graph, settings, args.out, say=say)
    print(f"wrote {args.out / 'bench-serve.json'}, bench-serve.md: " + summary_text(report["summary"]))


def cmd_bench_synthetic(args: argparse.Namespace) -> None:
    from fluxrt.bench import synthetic

    synthetic.main(args.rest[1:] if args.rest[:1] == ["--"] else args.rest)


def output_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def check_text(flag: str, text: str) -> None:
    """Text the tokenizers can take: valid Unicode (a shell can pass bytes that are not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{flag} is not valid UTF-8 text: {text.encode('utf-8', 'surrogateescape')[e.start:e.end]!r} "
                         f"at character {e.start}") from None


def check_writable(paths: list[Path]) -> None:
    """Every output file can be made: not a folder, in a folder that exists or can be made and that takes a
    new file (tried with an empty one, removed at once) -- before any stage runs."""
    import tempfile

    for path in paths:
        if path.is_dir():
            raise UsageError(f"--out {path} is a folder; name a .png file")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:  # made when the images are written
            folder = folder.parent
        try:
            if not folder.is_dir():
                raise NotADirectoryError(f"{folder} is not a folder")
            fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UsageError(f"--out {path} cannot be written: {e.strerror or e}") from None


def write_pngs(images, paths: list[Path], infos) -> None:
    """All images to temporary names first, then each renamed into place: an error leaves none half-written
    and no temporary file behind."""
    import tempfile

    temps = []
    try:
        for image, path, info in zip(images, paths, infos):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            temps.append(Path(tmp))
            image.save(tmp, format="PNG", pnginfo=info)
            os.chmod(tmp, 0o666 & ~UMASK)
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


class UsageError(FluxRTError):
    """A command-line argument is invalid."""


class OneLineParser(argparse.ArgumentParser):
    """argparse's own errors (a missing flag, a value of the wrong type) as one line, like fluxrt's, with
    where the flags and their ranges are described instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")



CALIBRATION_FLAGS = {"Fp8Settings.num_prompts": "--calibration-prompts",
                     "Fp8Settings.num_inference_steps": "--calibration-steps",
                     "Fp8Settings.height": "--calibration-size", "Fp8Settings.width": "--calibration-size",
                     "Fp8Settings.max_sequence_length": "--calibration-text-length",
                     "Fp8Settings.backend": "--calibration-backend", "Fp8Settings.fp8_attention": "--fp8-attention",
                     "Fp8Settings.fused_products": "--no-fused-products",
                     "Fp8Settings.fast_accumulation": "--fp8-fast-accumulation"}
# the API's names (keywords, settings fields) in messages, as each command's flags
FLAGS = {
    "tiny-model": {"seed": "--seed", "variant": "--variant"},
    "export": {"ExportRequest.components": "--components", "ExportRequest.precision": "--precision",
               "ExportRequest.attention": "--attention", "ExportRequest.loras": "--lora"},
    "generate": {"num_inference_steps": "--steps", "guidance_scale": "--guidance", "num_images_per_prompt": "--num-images",
                 "max_sequence_length": "--max-sequence-length", "height": "--height", "width": "--width",
                 "seed": "--seed", "strength": "--strength"},
    "serve": {"max_batch": "--max-batch", "batch_wait_ms": "--batch-wait-ms", "queue_size": "--queue-size",
              "timeout_s": "--timeout-s", "max_side": "--max-side", "png_compress_level": "--png-compress-level"},
    "bench-serve": {"width": "--size", "height": "--size", "steps": "--steps", "requests": "--requests",
                    "concurrency": "--concurrency", "max_batch": "--max-batch", "warmup": "--warmup"},
    "build": {"ShapeEnvelope.batch": "--batch", "ShapeEnvelope.text_length": "--text-length",
              "ShapeEnvelope.image_side": "--image-side", "BuildSettings.precision": "--precision",
              "BuildSettings.optimization_level": "--optimization-level", "BuildSettings.components": "--components",
              "BuildSettings.workspace_bytes": "--workspace-gib", **CALIBRATION_FLAGS},
    "quantize": CALIBRATION_FLAGS,
    "bench": {**{f"BenchSettings.{name}": f"--{name.replace('_', '-')}" for name in
                 ("height", "width", "steps", "text_length", "batch", "seed", "warmup", "iters", "prompt")},
              "num_inference_steps": "--steps", "max_sequence_length": "--text-length", "height": "--height",
              "width": "--width", "seed": "--seed"},
}


def flag_names(command: str, message: str) -> str:
    """``message`` with the API names it uses replaced by ``command``'s flags."""
    import re

    for name, flag in sorted(FLAGS.get(command, {}).items(), key=lambda kv: -len(kv[0])):
        message = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w])", flag, message)
    return message


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="fluxrt", description="Deploy FLUX.1 checkpoints: export, build, generate.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    t = sub.add_parser("tiny-model", help="write the built-in tiny checkpoint (diffusers layout)")
    t.add_argument("dir", type=Path, help="folder to write; must not exist or be empty")
    t.add_argument("--variant", choices=("dev", "schnell"), default="dev", help="dev (guidance input) or schnell "
                                                                              "(default dev)")
    t.add_argument("--seed", type=int, help="weights' random seed, 0..2**63-1 (default 0)")
    t.add_argument("--trained", action="store_true", help="the shipped trained model (dev; draws shapes: make demo) "
                                                          "instead of random weights")
    t.set_defaults(func=cmd_tiny_model)

    tt = sub.add_parser("train-tiny", help="train the tiny model on fluxrt's shapes data (needs the export extra)")
    tt.add_argument("out", type=Path, help="checkpoint folder to write; must not exist or be empty")
    tt.add_argument("--device", default="cpu", help="cpu or cuda (default cpu; the shipped model: cuda, an H200)")
    tt.add_argument("--seed", type=int, default=0, help="data, initialization and sampling seed (default 0)")
    tt.add_argument("--steps-scale", type=float, help="every phase's steps times this, (0, 100] (default 1: the "
                                                      "recipe in fluxrt/train/tiny.py)")
    tt.set_defaults(func=cmd_train_tiny)

    e = sub.add_parser("export", help="export a checkpoint's networks to ONNX")
    e.add_argument("checkpoint", type=Path, help="diffusers-layout FLUX.1 folder")
    e.add_argument("--out", type=Path, required=True, help="export folder to write")
    e.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="graph precision (default fp32); the VAE stays fp32 in fp16 and bf16 exports; bf16 runs on "
                        "ort-cuda, trt and torch, not ort-cpu")
    e.add_argument("--components", default="clip,t5,transformer,vae",
                   help="comma-separated subset of clip,t5,transformer,vae (default: all; vae writes "
                        "vae_decoder.onnx and vae_encoder.onnx)")
    e.add_argument("--attention", choices=ATTENTION_MODES, default="portable",
                   help="portable: standard ONNX ops (TensorRT fuses them); ort: the transformer's attention, "
                        "RMS norms, rotary embedding and adaptive LayerNorm as ONNX Runtime's fused kernels "
                        "(ONNX Runtime only); ort-kernels: ort plus fluxrt's own fused kernels for the remaining "
                        "element-wise work (ONNX Runtime with the library of `fluxrt ort-ops build`)")
    e.add_argument("--transformer", type=Path, help="Black Forest Labs single-file transformer (flux1-*.safetensors, "
                                                    "keys bare or under model.diffusion_model.), or a ComfyUI-style "
                                                    "full checkpoint that also bundles the VAE and text encoders "
                                                    "(each then taken from it); float8 files are upcast")
    e.add_argument("--vae", type=Path, help="Black Forest Labs single-file autoencoder (ae.safetensors; over a "
                                            "full checkpoint's own)")
    e.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="merge a LoRA file (diffusers/peft or kohya layout) into the exported transformer for good, "
                        "at SCALE, a finite number (default 1); repeat to stack them, merged in the order given; "
                        "the manifest records each file's path, sha256 and scale")
    e.set_defaults(func=cmd_export)

    o = sub.add_parser("ort-ops", help="fluxrt's ONNX Runtime kernel library (for --attention ort-kernels graphs)")
    o_sub = o.add_subparsers(dest="action", required=True)
    ob = o_sub.add_parser("build", help="compile it (CUDA kernels with nvcc, CPU kernels with the C++ compiler)")
    ob.add_argument("--out", type=Path, help="library file to write (default: the cache location the runtime "
                                             "looks in when FLUXRT_ORT_OPS is unset)")
    ob.add_argument("--cpu-only", action="store_true", help="CPU (float32) kernels only, no nvcc needed")
    ob.add_argument("--cuda-archs", help="compute capabilities, e.g. '90;120' (default: 80,86,89,90,100,120 "
                                         "or $FLUXRT_CUDA_ARCHS)")
    ob.add_argument("--ort-include", type=Path, help="folder holding ONNX Runtime's C API headers "
                                                     "(onnxruntime_c_api.h); default: $FLUXRT_ORT_INCLUDE, an installed "
                                                     "development package, else apt-get download libonnxruntime-dev")
    ob.set_defaults(func=cmd_ort_ops)

    b = sub.add_parser("build", help="build TensorRT plans from an export folder")
    b.add_argument("onnx_dir", type=Path, help="export folder written by fluxrt export (or a folder of ONNX graphs in "
                                              "Black Forest Labs' published layout)")
    b.add_argument("--out", type=Path, required=True, help="engine folder to write or update")
    b.add_argument("--precision", choices=("fp16", "bf16", "fp8"), required=True,
                   help="fp16/bf16 need an export of that precision; fp8 takes an FP8 export (fluxrt quantize) "
                        "or calibrates the transformer from an fp16 or bf16 export first")
    b.add_argument("--batch", default="1,1,4", help="MIN,OPT,MAX images per call, 1 <= MIN <= OPT <= MAX "
                                                    "(default 1,1,4); one number fixes it")
    b.add_argument("--text-length", help="MIN,OPT,MAX T5 tokens, 1 <= MIN <= OPT <= MAX <= 512 (dev) or 256 "
                                         "(schnell) (default 1,512,512 dev; 1,256,256 schnell)")
    b.add_argument("--image-side", default="512,1024,1536", help="MIN,OPT,MAX image side in pixels, multiples "
                                                                 "of 16, MIN <= OPT <= MAX (default 512,1024,1536)")
    b.add_argument("--optimization-level", type=int, default=3, help="TensorRT builder optimization level 0..5 "
                                                                     "(default 3)")
    b.add_argument("--workspace-gib", type=float, help="workspace memory limit in GiB, > 0 (default: TensorRT's)")
    b.add_argument("--timing-cache", type=Path, help="timing cache file to read and update (TensorRT only)")
    b.add_argument("--compute-capability", help="TensorRT-RTX targets, comma-separated from the library's list "
                                                "(1.7: SM75, SM80, SM86, SM89, SM120; default: the library's)")
    b.add_argument("--library", choices=("tensorrt", "tensorrt-rtx"), help="default: tensorrt if installed, "
                                                                           "else tensorrt-rtx")
    b.add_argument("--components", help="comma-separated subset of clip,t5,transformer,vae_decoder,vae_encoder "
                                        "(default: the text-to-image stages clip,t5,transformer,vae_decoder; add "
                                        "vae_encoder for image-to-image)")
    b.add_argument("--refittable", action="store_true", help="build the transformer's plan refittable, so that "
                                                               "LoRA files load without a rebuild (fp16/bf16; "
                                                               "TensorRT-RTX may need a GPU to build it)")
    add_calibration_flags(b, "fp8 from an fp16/bf16 export: ")
    b.set_defaults(func=cmd_build)

    q = sub.add_parser("quantize", help="an FP8 export folder from an fp16/bf16 one: calibrated once, run by "
                                        "ONNX Runtime and built by fluxrt build --precision fp8")
    q.add_argument("onnx_dir", type=Path, help="fp16 or bf16 export folder written by fluxrt export")
    q.add_argument("--out", type=Path, required=True, help="FP8 export folder to write")
    q.add_argument("--precision", choices=("fp8",), default="fp8", help="FP8 E4M3 block linears (the only one)")
    add_calibration_flags(q, "")
    q.set_defaults(func=cmd_quantize)

    m = sub.add_parser("bench", help="time each stage over export/engine folders and backends; JSON, markdown, PNG")
    m.add_argument("--run", action="append", required=True, metavar="LABEL=FOLDER:BACKEND",
                   help="one configuration; repeat to compare (backends: ort-cpu, ort-cuda, ort-cuda+graph "
                        "[the transformer replayed from a CUDA graph], trt, torch)")
    m.add_argument("--out", type=Path, required=True, help="folder for bench.json, bench.md, bench.png")
    m.add_argument("--prompt", default="a lighthouse on a cliff at dawn, oil painting", help="UTF-8 text")
    m.add_argument("--height", type=int, default=1024, help="pixels, a positive multiple of 16 (default 1024)")
    m.add_argument("--width", type=int, default=1024, help="pixels, a positive multiple of 16 (default 1024)")
    m.add_argument("--steps", type=int, default=4, help="sampling steps per iteration, 1..1000 (default 4)")
    m.add_argument("--text-length", type=int, default=512, help="T5 tokens, 1..512 dev, 1..256 schnell "
                                                                "(default 512)")
    m.add_argument("--batch", type=int, default=1, help="images per call, >= 1 (default 1)")
    m.add_argument("--seed", type=int, default=0, help="0..2**64-1 (default 0)")
    m.add_argument("--warmup", type=int, default=2, help="untimed iterations first, >= 0 (default 2)")
    m.add_argument("--iters", type=int, default=10, help="timed iterations, >= 1 (default 10)")
    m.set_defaults(func=cmd_bench)

    y = sub.add_parser("bench-synthetic", help="full-size FLUX.1-dev latency with random weights on a GPU "
                                               "(torch eager / torch.compile / ONNX Runtime CUDA)",
                       add_help=False)
    y.add_argument("rest", nargs=argparse.REMAINDER)
    y.set_defaults(func=cmd_bench_synthetic)

    bs = sub.add_parser("bench-serve", help="direct pipeline calls against fluxrt serve (with and without batching) "
                                            "at several concurrencies: latency and images/s; JSON, markdown")
    src = bs.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", type=Path, help="export folder written by fluxrt export")
    src.add_argument("--engines", type=Path, help="engine folder written by fluxrt build")
    bs.add_argument("--backend", choices=BACKEND_CHOICES[:-1], help="default: trt for --engines, ort-cpu for --onnx")
    bs.add_argument("--cuda-graph", action="store_true", help="ort-cuda: replay the transformer from CUDA graphs")
    bs.add_argument("--out", type=Path, required=True, help="folder for bench-serve.json and bench-serve.md")
    bs.add_argument("--size", default="64x64", help="WIDTHxHEIGHT pixels (default 64x64)")
    bs.add_argument("--steps", type=int, default=4, help="sampling steps per request, >= 1 (default 4)")
    bs.add_argument("--requests", type=int, default=32, help="requests per row, >= 1 (default 32)")
    bs.add_argument("--concurrency", default="1,4,16", help="client counts, comma-separated (default 1,4,16)")
    bs.add_argument("--max-batch", type=int, default=8, help="the batching server's --max-batch, >= 1 (default 8)")
    bs.add_argument("--batch-wait-ms", type=float, default=10.0, help="the batching server's --batch-wait-ms "
                                                                      "(default 10)")
    bs.add_argument("--warmup", type=int, default=2, help="untimed requests per mode first, >= 0 (default 2)")
    bs.add_argument("--ray-replicas", metavar="N[,N...]", help="instead of the direct and single-process rows: fluxrt "
                                                              "serve --ray with each replica count in turn (one GPU "
                                                              "each where there are GPUs), e.g. 1,2")
    bs.set_defaults(func=cmd_bench_serve)

    v = sub.add_parser("serve", help="serve OpenAI's images API over one pipeline (needs the serve extra)")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", type=Path, help="export folder written by fluxrt export")
    src.add_argument("--engines", type=Path, help="engine folder written by fluxrt build")
    v.add_argument("--backend", choices=BACKEND_CHOICES[:-1], help="default: trt for --engines, ort-cpu for --onnx")
    v.add_argument("--cuda-graph", action="store_true", help="ort-cuda: replay the transformer from CUDA graphs")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs "
                                                        "--api-key-file)")
    v.add_argument("--port", type=int, default=8000, help="TCP port, 1..65535 (default 8000)")
    v.add_argument("--max-batch", type=int, default=4, help="images per pipeline call, >= 1, and the most a request's "
                                                            "n may ask (default 4; engines: at most their batch)")
    v.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a call waits for requests to join it, "
                                                                     ">= 0 (default 10)")
    v.add_argument("--queue-size", type=int, default=64, help="requests accepted and waiting, >= 1; beyond it 429 "
                                                              "(default 64)")
    v.add_argument("--timeout-s", type=float, default=300.0, help="seconds a request may take, > 0; then 504 "
                                                                  "(default 300)")
    v.add_argument("--max-side", type=int, default=2048, help="the largest image side a request may ask, >= 16 "
                                                              "pixels (default 2048)")
    v.add_argument("--png-compress-level", type=int, default=1, help="zlib level 0-9 of the answers' PNGs (default 1: "
                                                                     "the same pixels as 6, fluxrt generate's, "
                                                                     "encoded ~2.5x faster, ~15%% larger)")
    v.add_argument("--api-key-file", type=Path, help="file holding the bearer token clients must send")
    v.add_argument("--log-prompts", action="store_true", help="log prompts in full (default: length and hash)")
    v.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="a LoRA merged for every request "
                                                                         "(repeatable)")
    v.add_argument("--lora-choice", action="append", type=Path, metavar="FILE", help="a LoRA requests may ask for "
                                                                                  "by name (the file's stem) in their "
                                                                                  "lora field (repeatable)")
    v.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (needs ray[serve])")
    v.add_argument("--replicas", type=int, default=1, help="--ray: pipeline replicas, one GPU each where there are "
                                                           "GPUs (default 1)")
    v.set_defaults(func=cmd_serve)

    g = sub.add_parser("generate", help="generate images from an export folder (or engine folder)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", type=Path, help="export folder written by fluxrt export")
    src.add_argument("--engines", type=Path, help="engine folder written by fluxrt build")
    g.add_argument("--prompt", required=True, help="UTF-8 text; CLIP reads its first 77 tokens, T5 "
                                                   "--max-sequence-length")
    g.add_argument("--out", type=Path, required=True, help="PNG to write (NAME-i.png for several images)")
    g.add_argument("--height", type=int, help="pixels, a positive multiple of 16 (with --engines: inside the "
                                              "plans' image sides) (default: --image's height, else 1024)")
    g.add_argument("--width", type=int, help="pixels, a positive multiple of 16 (with --engines: inside the "
                                             "plans' image sides) (default: --image's width, else 1024)")
    g.add_argument("--steps", type=int, help="sampling steps, 1..1000 (default: 28 dev, 4 schnell)")
    g.add_argument("--guidance", type=float, help="guidance scale, a finite number of magnitude < 3.4e38 "
                                                  "(default: 3.5 dev; schnell takes none)")
    g.add_argument("--seed", type=int, default=0, help="0..2**64-1 (default 0)")
    g.add_argument("--max-sequence-length", type=int, help="T5 tokens, 1..512 dev, 1..256 schnell (default: "
                                                           "the maximum)")
    g.add_argument("--num-images", type=int, default=1, help="images of the prompt, >= 1, as memory allows "
                                                             "(default 1)")
    g.add_argument("--backend", choices=BACKEND_CHOICES,
                   help="default: trt for --engines, ort-cpu for --onnx")
    g.add_argument("--cuda-graph", action="store_true",
                   help="ort-cuda: replay the transformer's steps from a CUDA graph (captured on the first step)")
    g.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="a LoRA file (diffusers/peft or kohya layout) merged into the transformer at SCALE, a finite "
                        "number (default 1); repeat to stack them (ONNX Runtime backends; not FP8 folders yet)")
    g.add_argument("--image", type=Path, metavar="FILE",
                   help="image-to-image from this image (PNG or JPEG, converted to RGB), as diffusers' "
                        "FluxImg2ImgPipeline: never resized, so --height/--width, if given, must be its size; needs "
                        "the folder's vae_encoder graph or plan")
    g.add_argument("--strength", type=float,
                   help="with --image: how much of it is redrawn, a number in [0, 1] (default 0.6): of the --steps N "
                        "step schedule, the steps from int(N - N x strength) on run, from the image under that step's "
                        "noise; 1 is text-to-image from the same seed")
    g.set_defaults(func=cmd_generate)
    return p


def one_line_warning(command: str):
    """Warnings (fluxrt's own and its libraries') as one line each, without Python's source line."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"fluxrt {command}: warning: {message}", file=sys.stderr if file is None else file, flush=True)

    return show


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench-synthetic"]:  # its own parser takes every flag, --help included
        argv = ["bench-synthetic", "--", *argv[1:]]
    args = parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning(args.command)
            args.func(args)
    except FluxRTError as e:
        print(f"fluxrt {args.command}: error: {flag_names(args.command, str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # an output that cannot be written, a folder that cannot be read
        print(f"fluxrt {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fluxrt {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
