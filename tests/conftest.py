"""Shared fixtures: the built-in tiny checkpoints (dev and schnell), their fp32 exports and the
dev model's fp16 and bf16 exports, written once per test session; fluxrt's ONNX Runtime op library."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from fluxrt.export.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {v: write_tiny_checkpoint(root / v, variant=v, seed=0 if v == "dev" else 1) for v in ("dev", "schnell")}


@pytest.fixture(scope="session")
def fp32_exports(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    from fluxrt.export.checkpoint import Checkpoint
    from fluxrt.export.onnx_export import ExportRequest, export_checkpoint

    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for variant, path in tiny_checkpoints.items():
        export_checkpoint(Checkpoint.open(path), root / variant,
                          ExportRequest(("clip", "t5", "transformer", "vae"), "fp32"))
        out[variant] = root / variant
    return out


@pytest.fixture(scope="session")
def half_exports(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    from fluxrt.export.checkpoint import Checkpoint
    from fluxrt.export.onnx_export import ExportRequest, export_checkpoint

    root = tmp_path_factory.mktemp("half")
    ckpt = Checkpoint.open(tiny_checkpoints["dev"])
    for precision in ("fp16", "bf16"):
        export_checkpoint(ckpt, root / precision, ExportRequest(("clip", "t5", "transformer", "vae"), precision))
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
