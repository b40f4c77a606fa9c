"""Shared fixtures: the built-in tiny checkpoints (dev and schnell), their fp32 exports and the
dev model's fp16 and bf16 exports, written once per test session; fluxrt's ONNX Runtime op library.

Each fixture's two halves (dev and schnell; fp16 and bf16) are written at once, one in a child process:
an export uses one core, and the files are the same wherever they are written (exports are reproducible
whatever the hash seed, tests/test_hard_inputs.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from child_process import Child

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EVERY_COMPONENT = "clip,t5,transformer,vae"
WRITE_TINY = ("import sys; from fluxrt.export.tiny import write_tiny_checkpoint; "
              "write_tiny_checkpoint(sys.argv[1], variant=sys.argv[2], seed=int(sys.argv[3]))")
EXPORT = ("import sys; from fluxrt.export.checkpoint import Checkpoint; "
          "from fluxrt.export.onnx_export import ExportRequest, export_checkpoint; "
          "export_checkpoint(Checkpoint.open(sys.argv[1]), sys.argv[2], "
          "ExportRequest(tuple(sys.argv[4].split(',')), sys.argv[3]))")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from fluxrt.export.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    with Child(WRITE_TINY, root / "schnell", "schnell", 1) as schnell:
        write_tiny_checkpoint(root / "dev", variant="dev", seed=0)
        schnell.wait()
    return {v: root / v for v in ("dev", "schnell")}


@pytest.fixture(scope="session")
def fp32_exports(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    from fluxrt.export.checkpoint import Checkpoint
    from fluxrt.export.onnx_export import ExportRequest, export_checkpoint

    root = tmp_path_factory.mktemp("onnx")
    with Child(EXPORT, tiny_checkpoints["dev"], root / "dev", "fp32", EVERY_COMPONENT) as dev:
        export_checkpoint(Checkpoint.open(tiny_checkpoints["schnell"]), root / "schnell",
                          ExportRequest(tuple(EVERY_COMPONENT.split(",")), "fp32"))
        dev.wait()
    return {v: root / v for v in ("dev", "schnell")}


@pytest.fixture(scope="session")
def half_exports(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    from fluxrt.export.checkpoint import Checkpoint
    from fluxrt.export.onnx_export import ExportRequest, export_checkpoint

    root = tmp_path_factory.mktemp("half")
    with Child(EXPORT, tiny_checkpoints["dev"], root / "bf16", "bf16", EVERY_COMPONENT) as bf16:
        export_checkpoint(Checkpoint.open(tiny_checkpoints["dev"]), root / "fp16",
                          ExportRequest(tuple(EVERY_COMPONENT.split(",")), "fp16"))
        bf16.wait()
    return {p: root / p for p in ("fp16", "bf16")}


@pytest.fixture(scope="session")
def ops_library(tmp_path_factory) -> Path:
    """$FLUXRT_ORT_OPS where a build was brought along (the GPU machine has no network for the
    headers), else a CPU build compiled here."""
    from fluxrt.runtime import ort_ops
    from fluxrt.runtime.ort_ops import build as ort_build

    if os.environ.get(ort_ops.ENV_LIBRARY):
        return Path(os.environ[ort_ops.ENV_LIBRARY])
    return ort_build.build(tmp_path_factory.mktemp("ort-ops") / ort_ops.LIBRARY_NAME, cuda=False)
