"""Shared fixtures: the built-in tiny checkpoints (dev and schnell), their fp32 exports and the
dev model's fp16 and bf16 exports, written once per test session; fluxrt's ONNX Runtime op library.

Each fixture's two halves (dev and schnell; fp16 and bf16) are written at once, one in a child process:
an export uses one core, and the files are the same wherever they are written (exports are reproducible
whatever the hash seed, tests/test_hard_inputs.py).

With pytest-xdist (``make test`` runs two workers, one test file each at a time), every session fixture here is
made once for all workers: the first to need it makes it under a lock, in a folder beside the workers' own, and
the others wait for it and use it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock

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


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder ``name`` that ``make(folder)`` fills, made once per test run however many xdist workers ask."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, which holds each worker's
    root = base / f"shared-{name}"
    with FileLock(str(base / f"shared-{name}.lock")):
        if not (root / ".made").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            make(root)
            (root / ".made").touch()
    return root


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from fluxrt.export.tiny import write_tiny_checkpoint

    def make(root: Path) -> None:
        with Child(WRITE_TINY, root / "schnell", "schnell", 1) as schnell:
            write_tiny_checkpoint(root / "dev", variant="dev", seed=0)
            write_tiny_checkpoint(root / "trained", trained=True)  # the shipped trained model (a copy)
            schnell.wait()

    root = made_once(tmp_path_factory, "tiny", make)
    return {v: root / v for v in ("dev", "schnell", "trained")}


def export_pair(tmp_path_factory, name: str, child: tuple, here: tuple, *more: tuple) -> Path:
    """Exports at once, ``child`` (and ``more``) = (checkpoint, folder name, precision) in child processes, ``here``
    in this one."""
    from contextlib import ExitStack

    from fluxrt.export.checkpoint import Checkpoint
    from fluxrt.export.onnx_export import ExportRequest, export_checkpoint

    def make(root: Path) -> None:
        with ExitStack() as stack:
            others = [stack.enter_context(Child(EXPORT, c[0], root / c[1], c[2], EVERY_COMPONENT))
                      for c in (child, *more)]
            export_checkpoint(Checkpoint.open(here[0]), root / here[1],
                              ExportRequest(tuple(EVERY_COMPONENT.split(",")), here[2]))
            for other in others:
                other.wait()

    return made_once(tmp_path_factory, name, make)


@pytest.fixture(scope="session")
def fp32_exports(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """dev and schnell (seeded random weights) and the shipped trained model, fp32."""
    root = export_pair(tmp_path_factory, "onnx", (tiny_checkpoints["dev"], "dev", "fp32"),
                       (tiny_checkpoints["schnell"], "schnell", "fp32"),
                       (tiny_checkpoints["trained"], "trained", "fp32"))
    return {v: root / v for v in ("dev", "schnell", "trained")}


@pytest.fixture(scope="session")
def half_exports(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = export_pair(tmp_path_factory, "half", (tiny_checkpoints["dev"], "bf16", "bf16"),
                       (tiny_checkpoints["dev"], "fp16", "fp16"))
    return {p: root / p for p in ("fp16", "bf16")}


@pytest.fixture(scope="session")
def ops_library(tmp_path_factory) -> Path:
    """$FLUXRT_ORT_OPS where a build was brought along (the GPU machine has no network for the
    headers), else a CPU build compiled here."""
    from fluxrt.runtime import ort_ops
    from fluxrt.runtime.ort_ops import build as ort_build

    if os.environ.get(ort_ops.ENV_LIBRARY):
        return Path(os.environ[ort_ops.ENV_LIBRARY])
    root = made_once(tmp_path_factory, "ort-ops", lambda root: ort_build.build(root / ort_ops.LIBRARY_NAME, cuda=False))
    return root / ort_ops.LIBRARY_NAME


@pytest.fixture(scope="session")
def kernels_dev(tiny_checkpoints, fp32_exports, tmp_path_factory) -> Path:
    """The fp32 dev export with its transformer re-exported ``--attention ort-kernels`` (``fluxrt export
    --components transformer`` into a copy of the portable export): the folder test_ort_kernels' toolkit test and
    test_fp8_kernels' quantize tests read. Read-only: a test that changes it copies it first."""
    from fluxrt.export.checkpoint import Checkpoint
    from fluxrt.export.onnx_export import ExportRequest, export_checkpoint

    def make(root: Path) -> None:
        shutil.copytree(fp32_exports["dev"], root / "kernels")
        export_checkpoint(Checkpoint.open(tiny_checkpoints["dev"]), root / "kernels",
                          ExportRequest(("transformer",), "fp32", attention="ort-kernels"))

    return made_once(tmp_path_factory, "kernels-dev", make) / "kernels"


@pytest.fixture(scope="session")
def deep_kernels_transformer(tmp_path_factory) -> Path:
    """test_ort_kernels' 2+3-block ort-kernels transformer graph (fp32), exported once for its tests and
    test_fp8_kernels'. Read-only."""
    from test_ort_kernels import export_kernels_transformer

    return made_once(tmp_path_factory, "deep-kernels", export_kernels_transformer) / "t.onnx"
