"""Faults around engine folders: ``fluxrt build`` killed at random moments, two builds into one folder
at once, and folders that are empty, incomplete, corrupted, built elsewhere or from other graphs.

The builds are real ``python -m fluxrt.cli build`` processes with TensorRT-RTX (CPU-only ahead-of-time
builds); plans cannot execute here, so a folder is judged by ``verify_plan`` and ``up_to_date``, and the
runtime's refusals are checked through ``FluxPipeline.load`` and ``fluxrt generate``, which verify every
plan before activating any.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fluxrt.artifacts import EngineFolder, graph_fingerprint
from fluxrt.cli import main
from fluxrt.components import STAGES, ShapeEnvelope
from fluxrt.engines.folder import BuildSettings, up_to_date
from fluxrt.errors import EngineError, FluxRTError
from fluxrt.runtime import FluxPipeline

trt = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX (fluxrt[trt-rtx]) is not installed")
LIB = {"library": "tensorrt-rtx", "version": trt.__version__}
SETTINGS = BuildSettings(precision="fp16", envelope=ShapeEnvelope(batch=(1, 1, 2), text_length=(1, 16, 32),
                                                                  image_side=(32, 32, 64)),
                         compute_capabilities=("SM89",))
KILL_SEED, KILL_ROUNDS, KILL_AFTER_S = 6, 6, (0.3, 3.0)  # a whole build takes 5-10 s


def build_command(export: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "fluxrt.cli", "build", str(export), "--out", str(out), "--precision", "fp16",
            "--batch", "1,1,2", "--text-length", "1,16,32", "--image-side", "32,32,64", "--compute-capability",
            "SM89", "--library", "tensorrt-rtx"]


def start_build(export: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(build_command(export, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def actions(stdout: str) -> dict[str, str]:
    """``{component: "built"|"kept"}`` from the summary line of ``fluxrt build``."""
    return dict(re.findall(r"(\w+) (built|kept)", stdout.strip().splitlines()[-1]))


def rebuild_reasons(export: Path, out: Path) -> dict[str, str | None]:
    """Why a later build would rebuild each component; None: it keeps (and so trusts) the plan."""
    return {name: up_to_date(out, name, graph_fingerprint(export / f"{name}.onnx")["sha256"], SETTINGS, LIB)
            for name in STAGES}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if ".tmp" in p.name) if out.is_dir() else []


def assert_complete(out: Path) -> None:
    folder = EngineFolder.open(out)
    assert folder.envelope == SETTINGS.envelope and folder.precision == "fp16"
    for name in STAGES:
        assert folder.verify_plan(name, LIB, None) == out / f"{name}.plan"
    assert not leftovers(out), leftovers(out)


@pytest.fixture(scope="module")
def concurrent_build(half_exports, tmp_path_factory) -> tuple[Path, list]:
    """An engine folder written by two ``fluxrt build`` processes started at the same moment."""
    out = tmp_path_factory.mktemp("engines") / "fp16"
    procs = [start_build(half_exports["fp16"], out) for _ in range(2)]
    return out, [(p.wait(timeout=300), *p.communicate()) for p in procs]


def test_two_builds_into_one_folder_at_once(concurrent_build):
    out, results = concurrent_build
    for code, stdout, stderr in results:
        assert code == 0, stderr
    done = [actions(stdout) for _, stdout, _ in results]
    for name in STAGES:  # the per-component lock: each plan is built once, the other build keeps it
        assert sorted(d[name] for d in done) == ["built", "kept"], done
    assert_complete(out)


def test_killed_builds_leave_nothing_trusted_half_written(half_exports, tmp_path):
    """SIGKILL ``fluxrt build`` at seeded random moments; after each kill every plan a later build would keep
    verifies; the next build completes what is missing, keeps what is done, and leaves no temporaries."""
    export, out = half_exports["fp16"], tmp_path / "eng"
    rng = random.Random(KILL_SEED)
    log = []
    for _ in range(KILL_ROUNDS):
        delay = rng.uniform(*KILL_AFTER_S)
        proc = start_build(export, out)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        reasons = rebuild_reasons(export, out)
        kept = {name for name, reason in reasons.items() if reason is None}
        log.append((round(delay, 2), proc.returncode, reasons, leftovers(out)))
        if (out / "engines.json").is_file():
            folder = EngineFolder.open(out)
            for name in kept:
                folder.verify_plan(name, LIB, None)
    print("\nkill rounds (delay s, exit status, why a later build rebuilds, temporaries left):", *log, sep="\n")
    mtimes = {name: (out / f"{name}.plan").stat().st_mtime_ns for name in kept}
    r = subprocess.run(build_command(export, out), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert kept <= {n for n, a in actions(r.stdout).items() if a == "kept"}, (r.stdout, log)  # done stays done
    assert {name: (out / f"{name}.plan").stat().st_mtime_ns for name in kept} == mtimes
    assert_complete(out)
    assert set(actions(subprocess.run(build_command(export, out), capture_output=True, text=True,
                                      timeout=300).stdout).values()) == {"kept"}


# ---- the runtime's refusals ------------------------------------------------------------------------

def refused(folder: Path, match: str, error=EngineError, capsys=None) -> None:
    """Both the API and ``fluxrt generate`` refuse ``folder`` with ``match``, before activating any plan."""
    with pytest.raises(error, match=match):
        FluxPipeline.load(folder)
    if capsys is not None:
        capsys.readouterr()
        code = main(["generate", "--engines", str(folder), "--prompt", "a", "--out", str(folder / "x.png"),
                     "--height", "32", "--width", "32", "--steps", "1"])
        err = capsys.readouterr().err
        assert code == 2 and re.search(match, err) and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err


def damaged_copy(concurrent_build, tmp_path) -> Path:
    return Path(shutil.copytree(concurrent_build[0], tmp_path / "eng"))


def test_empty_or_incomplete_folders_are_refused(concurrent_build, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "is neither an export folder .* nor an engine folder", FluxRTError, capsys)
    out = damaged_copy(concurrent_build, tmp_path)
    (out / "transformer.plan").unlink()
    refused(out, r"transformer plan .*transformer.plan is missing \(run fluxrt build again\)", capsys=capsys)
    (out / "t5.plan.json").unlink()
    refused(out, "t5 plan sidecar .*t5.plan.json is missing", capsys=capsys)
    (out / "engines.json").write_text(json.dumps({"format": "fluxrt-engines/2", "precision": "fp16"}))
    refused(out, r"engines.json is incomplete or malformed \(KeyError: 'dims'\); run fluxrt build again",
            capsys=capsys)
    (out / "engines.json").write_text("[1, 2")
    refused(out, "engine folder index .*engines.json is not readable JSON", capsys=capsys)


def test_corrupted_plans_are_refused(concurrent_build, tmp_path, capsys):
    out = damaged_copy(concurrent_build, tmp_path)
    plan = out / "vae_decoder.plan"
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    plan.write_bytes(bytes(data))
    refused(out, "vae_decoder plan .* does not match its sidecar: corrupted or replaced", capsys=capsys)
    (out / "clip.plan.json").write_text("[]")
    refused(out, "clip plan sidecar .* must hold a JSON object", capsys=capsys)


def test_plans_for_another_gpu_or_library_are_refused(concurrent_build, tmp_path, monkeypatch, capsys):
    out = damaged_copy(concurrent_build, tmp_path)
    monkeypatch.setattr("fluxrt.runtime.trt.import_trt", lambda prefer=None: trt)
    monkeypatch.setattr("fluxrt.runtime.trt.current_gpu", lambda: {"name": "NVIDIA H100", "compute_capability":
                                                                      "SM90"})
    refused(out, r"clip plan .* was built for \['SM89'\]; this GPU \(NVIDIA H100\) is SM90: rebuild it here",
            capsys=capsys)
    monkeypatch.undo()
    sidecar = json.loads((out / "t5.plan.json").read_text())
    (out / "t5.plan.json").write_text(json.dumps(dict(sidecar, version="1.0.0")))
    refused(out, r"t5 plan .* was built with tensorrt-rtx 1.0.0; this machine has tensorrt", capsys=capsys)


def test_plans_from_other_graphs_or_builds_are_refused(concurrent_build, tmp_path, capsys):
    """What a build killed after copying a new export's side files (or after rebuilding some plans with new
    settings) leaves: plans that disagree with export_manifest.json or engines.json are not used."""
    out = damaged_copy(concurrent_build, tmp_path)
    manifest = json.loads((out / "export_manifest.json").read_text())
    manifest["components"]["t5"]["fingerprint"]["sha256"] = "0" * 64  # the copy of another export's manifest
    (out / "export_manifest.json").write_text(json.dumps(manifest))
    refused(out, r"t5 plan .* was built from another t5 graph than the one this folder records: the folder "
                 r"mixes two exports", capsys=capsys)
    out = Path(shutil.copytree(concurrent_build[0], tmp_path / "eng2"))
    index = json.loads((out / "engines.json").read_text())
    (out / "engines.json").write_text(json.dumps(dict(index, envelope=dict(index["envelope"], batch=[1, 1, 4]))))
    refused(out, r"clip plan .* was built as fp16 for envelope .*'batch': \[1, 1, 2\].* but engines.json says fp16 "
                 r"for .*'batch': \[1, 1, 4\].*: the folder mixes two builds", capsys=capsys)


def test_generate_hashes_each_plan_once(concurrent_build, tmp_path, monkeypatch, capsys):
    """`fluxrt generate --engines` verifies every plan (a full-size one is tens of GB) exactly once before
    loading any: here the load itself then fails, as TensorRT-RTX cannot deserialize without a usable GPU."""
    import fluxrt.artifacts

    out = damaged_copy(concurrent_build, tmp_path)
    hashed = []
    real = fluxrt.artifacts.sha256_file
    monkeypatch.setattr(fluxrt.artifacts, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    monkeypatch.setattr("fluxrt.runtime.trt.import_trt", lambda prefer=None: trt)
    code = main(["generate", "--engines", str(out), "--prompt", "a", "--out", str(tmp_path / "x.png"),
                 "--height", "32", "--width", "32", "--steps", "1"])
    plans = sorted(n for n in hashed if n.endswith(".plan"))
    assert plans == sorted(f"{s}.plan" for s in STAGES), hashed
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err, err
