"""The ``fluxrt`` command line: one console script, one subcommand per pipeline stage.

Heavy libraries are imported inside each subcommand, so ``fluxrt generate`` never loads torch.
Errors fluxrt raises on purpose become one line on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fluxrt.errors import FluxRTError


def cmd_tiny_model(args: argparse.Namespace) -> None:
    from fluxrt.export.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(args.dir, variant=args.variant, seed=args.seed)
    print(f"wrote tiny FLUX.1-{args.variant} checkpoint (seed {args.seed}) to {path}")


def cmd_export(args: argparse.Namespace) -> None:
    from fluxrt.export.checkpoint import Checkpoint
    from fluxrt.export.onnx_export import ExportRequest, export_checkpoint

    try:
        request = ExportRequest(components=tuple(c.strip() for c in args.components.split(",") if c.strip()),
                                precision=args.precision)
    except ValueError as e:
        raise UsageError(str(e)) from None
    ckpt = Checkpoint.open(args.checkpoint, transformer_file=args.transformer, vae_file=args.vae)
    manifest = export_checkpoint(ckpt, args.out, request)
    total = sum(r["export_seconds"] for n, r in manifest["components"].items() if n in request.graphs)
    print(f"exported {', '.join(request.graphs)} ({manifest['variant']}, {args.precision}) to {args.out} "
          f"in {total:.1f}s")


def cmd_generate(args: argparse.Namespace) -> None:
    import json

    from PIL.PngImagePlugin import PngInfo

    from fluxrt.runtime import FluxPipeline
    from fluxrt.runtime.pipeline import progress_bar

    if args.engines:
        raise UsageError("--engines: TensorRT engine folders are not supported by this build yet; use --onnx")
    pipe = FluxPipeline.load(args.onnx, backend=args.backend)
    out = pipe(prompt=args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
               guidance_scale=args.guidance, max_sequence_length=args.max_sequence_length,
               num_images_per_prompt=args.num_images, seed=args.seed, output_type="pil",
               callback=progress_bar("fluxrt generate:"))
    settings = dict(out.settings, prompt=args.prompt, backend=args.backend, model=str(args.onnx),
                    variant=pipe.variant, precision=pipe.folder.precision)
    settings.pop("prompts", None)
    paths = output_paths(args.out, len(out.images))
    for i, (image, path) in enumerate(zip(out.images, paths)):
        info = PngInfo()
        for key, value in dict(settings, index=i).items():
            info.add_text(f"fluxrt:{key}", json.dumps(value) if not isinstance(value, str) else value)
        write_png(image, path, info)
        print(f"wrote {path}")


def output_paths(out: Path, n: int) -> list[Path]:
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {out}")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def write_png(image, path: Path, info) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


class UsageError(FluxRTError):
    """A command-line argument is invalid."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluxrt", description="Deploy FLUX.1 checkpoints: export, build, generate.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiny-model", help="write the built-in tiny checkpoint (diffusers layout)")
    t.add_argument("dir", type=Path)
    t.add_argument("--variant", choices=("dev", "schnell"), default="dev")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_tiny_model)

    e = sub.add_parser("export", help="export a checkpoint's networks to ONNX")
    e.add_argument("checkpoint", type=Path, help="diffusers-layout FLUX.1 folder")
    e.add_argument("--out", type=Path, required=True, help="export folder to write")
    e.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    e.add_argument("--components", default="clip,t5,transformer,vae",
                   help="comma-separated subset of clip,t5,transformer,vae (default: all)")
    e.add_argument("--transformer", type=Path, help="Black Forest Labs single-file transformer (flux1-*.safetensors)")
    e.add_argument("--vae", type=Path, help="Black Forest Labs single-file autoencoder (ae.safetensors)")
    e.set_defaults(func=cmd_export)

    g = sub.add_parser("generate", help="generate images from an export folder (or engine folder)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", type=Path, help="export folder written by fluxrt export")
    src.add_argument("--engines", type=Path, help="engine folder written by fluxrt build")
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", type=Path, required=True, help="PNG to write (NAME-i.png for several images)")
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--steps", type=int, help="default: 28 (dev), 4 (schnell)")
    g.add_argument("--guidance", type=float, help="default: 3.5 (dev); schnell takes none")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-sequence-length", type=int, help="T5 tokens; default 512 (dev), 256 (schnell)")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--backend", choices=("ort-cpu", "ort-cuda", "trt", "torch"), default="ort-cpu")
    g.set_defaults(func=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except FluxRTError as e:
        print(f"fluxrt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fluxrt {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
