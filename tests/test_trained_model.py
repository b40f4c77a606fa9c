"""The shipped trained tiny model draws what its prompt asks, at every precision and through every backend CI can
run, and the check is shown to catch a pipeline that feeds the wrong text or ignores guidance.

A grid of prompts (every colour x shape on a background, and the four positions) is generated at 64x64 on
``ort-cpu`` and judged by :mod:`fluxrt.train.adherence`: at fp32 at least 85% pass; fp16, FP8 (fluxrt's CPU
kernels over an ``--attention ort-kernels`` export) and the torch reference backend within 5 points of fp32 (fp16
with ``make test-all``: it needs a whole fp16 export).
The same grid with CLIP and T5 fed another prompt's tokens, or with the transformer's guidance input zeroed,
passes far less often: the rate measures adherence, not pictures in general."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fluxrt.train import adherence
from fluxrt.train.shapes import COLOURS, POSITIONS, SHAPES, Scene

TRAINED = Path(__file__).resolve().parent.parent / "export" / "trained" / "dev"
pytestmark = pytest.mark.skipif(not (TRAINED / "model_index.json").is_file(), reason="no trained model shipped")

STEPS = 12
TEXT_LENGTH = 64
MIN_RATE = 0.85


def grid() -> list[Scene]:
    names = list(COLOURS)
    scenes = [Scene(c, s, names[(i + d + j) % 6]) for i, c in enumerate(names) for j, s in enumerate(SHAPES)
              for d in (1, 3)]  # 36: every colour x shape on two backgrounds
    scenes += [Scene(names[k % 6], SHAPES[k % 3], names[(k + 2) % 6], POSITIONS[k % 4]) for k in range(8)]
    return scenes


SCENES = grid()


@pytest.fixture(scope="module")
def trained(tiny_checkpoints, fp32_exports, tmp_path_factory) -> dict[str, Path]:
    """The trained checkpoint, its fp32 export (the session's) and a copy of that export with the transformer
    re-exported ``--attention ort-kernels`` (the source of the FP8 folder)."""
    import shutil

    from fluxrt.export.checkpoint import Checkpoint
    from fluxrt.export.onnx_export import ExportRequest, export_checkpoint

    root = tmp_path_factory.mktemp("trained")
    ckpt = tiny_checkpoints["trained"]
    kernels = shutil.copytree(fp32_exports["trained"], root / "kernels")
    export_checkpoint(Checkpoint.open(ckpt), kernels, ExportRequest(("transformer",), "fp32", attention="ort-kernels"))
    return {"ckpt": ckpt, "fp32": fp32_exports["trained"], "kernels": kernels}


@pytest.fixture(scope="module")
def fp8(trained, ops_library, tmp_path_factory) -> Path:
    from fluxrt.cli import main
    from fluxrt.runtime import ort_ops

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ort_ops.ENV_LIBRARY, str(ops_library))
        out = tmp_path_factory.mktemp("trained-fp8") / "fp8"
        assert main(["quantize", str(trained["kernels"]), "--out", str(out), "--calibration-prompts", "4",
                     "--calibration-steps", "4", "--calibration-size", "64",
                     "--calibration-text-length", str(TEXT_LENGTH)]) == 0
    return out


def generate(pipe, scenes=SCENES, **kw) -> list[np.ndarray]:
    out = pipe([s.caption for s in scenes], height=64, width=64, num_inference_steps=STEPS,
               max_sequence_length=TEXT_LENGTH, seed=0, **kw)
    return [np.asarray(im) for im in out.images]


def rate(pipe, **kw) -> float:
    return adherence.rate(generate(pipe, **kw), SCENES)


@pytest.fixture(scope="module")
def fp32_rate(trained) -> float:
    from fluxrt.runtime import FluxPipeline

    return rate(FluxPipeline.load(trained["fp32"], backend="ort-cpu"))


def test_fp32_draws_what_the_prompts_ask(fp32_rate):
    assert fp32_rate >= MIN_RATE


def test_the_torch_backend_draws_as_fp32(trained, fp32_rate):
    from fluxrt.artifacts import ExportFolder
    from fluxrt.export.torch_runner import torch_runners
    from fluxrt.runtime import FluxPipeline

    torch_rate = rate(FluxPipeline.load(trained["fp32"], runners=torch_runners(ExportFolder.open(trained["fp32"]))))
    assert abs(torch_rate - fp32_rate) <= 0.05, (torch_rate, fp32_rate)


@pytest.mark.slow  # a whole fp16 export (make test-all)
def test_fp16_draws_as_fp32(trained, fp32_rate, tmp_path):
    from fluxrt.export.checkpoint import Checkpoint
    from fluxrt.export.onnx_export import ExportRequest, export_checkpoint
    from fluxrt.runtime import FluxPipeline

    export_checkpoint(Checkpoint.open(trained["ckpt"]), tmp_path / "fp16",
                      ExportRequest(("clip", "t5", "transformer", "vae"), "fp16"))
    fp16_rate = rate(FluxPipeline.load(tmp_path / "fp16", backend="ort-cpu"))
    assert abs(fp16_rate - fp32_rate) <= 0.05, (fp16_rate, fp32_rate)


def test_fp8_draws_as_fp32(fp8, fp32_rate, ops_library, monkeypatch):
    from fluxrt.runtime import FluxPipeline, ort_ops

    monkeypatch.setenv(ort_ops.ENV_LIBRARY, str(ops_library))
    fp8_rate = rate(FluxPipeline.load(fp8, backend="ort-cpu"))
    assert abs(fp8_rate - fp32_rate) <= 0.05, (fp8_rate, fp32_rate)


class Rewired:
    """A runner that changes one input before the runner it wraps sees it."""

    def __init__(self, inner, name: str, change):
        self.inner, self.name, self.change = inner, name, change

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def infer(self, feed: dict) -> dict:
        return self.inner.infer(dict(feed, **{self.name: self.change(feed[self.name])}))


def test_the_rate_collapses_with_the_wrong_text_or_no_guidance(trained, fp32_rate):
    """Test of the test: CLIP and T5 given the tokens of the prompts in reverse order, or the transformer's
    guidance zeroed (an input left unfed), and the pictures no longer follow the prompts."""
    from fluxrt.runtime import FluxPipeline

    swapped = FluxPipeline.load(trained["fp32"], backend="ort-cpu")
    for name in ("clip", "t5"):
        swapped.runners[name] = Rewired(swapped.runners[name], "input_ids", lambda ids: ids[::-1].copy())
    unguided = FluxPipeline.load(trained["fp32"], backend="ort-cpu")
    unguided.runners["transformer"] = Rewired(unguided.runners["transformer"], "guidance", np.zeros_like)
    for pipe in (swapped, unguided):
        assert rate(pipe) <= fp32_rate - 0.3


def test_training_record_ships_with_the_model():
    record = json.loads((TRAINED / "training.json").read_text())
    assert record["settings"]["seed"] == 0 and record["flow_loss"] and record["distill_loss"]
    assert record["flow_loss"][-1][1] < record["flow_loss"][0][1] / 2  # it learnt
    assert sum(f.stat().st_size for f in TRAINED.rglob("*") if f.is_file()) < 12 * 2**20
    assert os.access(TRAINED / "transformer" / "config.json", os.R_OK)
