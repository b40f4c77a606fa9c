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
