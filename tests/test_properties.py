"""Property-based tests, one per command (issue 13): hypothesis draws each command's options, valid and
invalid, and corrupts the files it reads (configs, manifests, safetensors headers, tokenizer files, graphs).
Whatever is drawn, the command either exits 0 with what it promises, or exits 2 with one error line that
names the flag or the file at fault; never a traceback; and a failed run leaves nothing in its output folder
that a later run would trust or have to clean, and never changes its input.

The draws are derandomized (the same examples on every run) and few per command: each valid draw runs the
real command on the tiny model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fluxrt.cli import main

PROPERTY = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


def run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own errors
            code = e.code
    return code, err.getvalue()


def once_per_draw(*fixtures: str):
    """Run each distinct draw once: option() weights validity by repeating True, so hypothesis (which tells
    examples apart by the choices behind them) can draw one value twice, and a valid draw runs a real
    command. A draw counts as run once it has passed; a failing one is run again whenever hypothesis asks."""
    def wrap(test):
        passed = set()

        @functools.wraps(test)
        def run_once(**kwargs):
            key = repr([(name, kwargs[name]) for name in sorted(kwargs) if name not in fixtures])
            if key in passed:
                return
            test(**kwargs)
            passed.add(key)
        return run_once
    return wrap


def option(valid: list, invalid: list):
    """(is it valid, value), valid three times in four; a value of None leaves the flag out."""
    return st.sampled_from([True, True, True, False]).flatmap(
        lambda ok: st.tuples(st.just(ok), st.sampled_from(valid if ok else invalid)))


def flags(draw: dict) -> list[str]:
    argv = []
    for flag, (_, value) in draw.items():
        if value is not None:
            argv += [flag, value]
    return argv


def faults(drawn: dict, corruption: str | None = None, needle: str | None = None) -> dict[str, str]:
    """What a draw made invalid -> the text its error must contain: each invalid flag names itself; a
    corruption its file or key (``needle``; None where the command does not read what was corrupted)."""
    bad = {flag: flag for flag, (ok, _) in drawn.items() if not ok}
    if needle:
        bad[corruption] = needle
    return bad


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) and its SHA-256; folders as entries of their own."""
    if not root.exists():
        return {}
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


LEFTOVER = (".staging", ".tmp", ".probe", ".partial")


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders anywhere under ``root``. (Lock files stay where a command wrote, as
    flock needs; a failed run into a new folder leaves no folder at all, which the tests check apart.)"""
    if not root.is_dir():
        return []
    return [str(p) for p in root.rglob("*") if any(mark in p.name for mark in LEFTOVER)]


def check_outcome(code: int, stderr: str, bad: dict[str, str], command: str) -> None:
    """``bad``: what was made invalid -> a text the error line must contain (a flag or a file name)."""
    assert "Traceback" not in stderr, stderr
    if not bad:
        assert code == 0, stderr
        return
    errors = [line for line in stderr.strip().splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1, (bad, code, stderr)
    assert errors[0].startswith(f"fluxrt {command}: error: "), errors
    assert stderr.strip().splitlines()[-1] == errors[0], stderr  # the error is the last word
    assert any(needle in errors[0] for needle in bad.values()), (bad, errors[0])


def run_checked(argv: list, drawn: dict, corruption: str, needle: str | None, root: Path, source: Path) -> dict:
    """Run the command, check its outcome against what the draw made invalid, and that it left its ``source``
    as it was and no temporary file under ``root``; return what was invalid."""
    before = tree_digest(source)
    code, stderr = run(argv)
    bad = faults(drawn, corruption, needle)
    check_outcome(code, stderr, bad, argv[0])
    assert tree_digest(source) == before, f"{argv[0]} changed its source"
    assert not leftovers(root), leftovers(root)
    return bad


# ---------------------------------------------------------------- corrupting files


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def rewrite_safetensors_header(path: Path, change) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header = change(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def header_as_list(header):
    return [header]


def header_without_offsets(header):
    del header[first_tensor(header)]["data_offsets"]
    return header


def header_int8(header):
    name = first_tensor(header)
    begin, end = header[name]["data_offsets"]
    header[name]["dtype"] = "I8"
    header[name]["shape"] = [end - begin]
    return header


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"
# checkpoint corruption -> (what it does to a copy of the tiny checkpoint, text the error must contain); the
# weights are read only for the components exported (WEIGHTS_OF), configs and tokenizers always
WEIGHTS_OF = {"header that is a list": "vae", "header without data_offsets": "vae", "int8 weights": "vae",
              "truncated weights": "clip", "missing shard": "transformer"}
CHECKPOINT_CORRUPTIONS = {
    "none": (None, None),
    "unknown config key": (lambda ck: edit_json(ck / "transformer/config.json", lambda d: d.update(foo_bar=1)),
                           "foo_bar"),
    "config value of the wrong type": (
        lambda ck: edit_json(ck / "transformer/config.json", lambda d: d.update(num_layers="two")), "num_layers"),
    "config that is not JSON": (lambda ck: (ck / "vae/config.json").write_text("{not json"), "config.json"),
    "missing model_index.json": (lambda ck: (ck / "model_index.json").unlink(), "model_index.json"),
    "header that is a list": (lambda ck: rewrite_safetensors_header(ck / VAE_WEIGHTS, header_as_list),
                              "diffusion_pytorch_model.safetensors"),
    "header without data_offsets": (lambda ck: rewrite_safetensors_header(ck / VAE_WEIGHTS, header_without_offsets),
                                    "diffusion_pytorch_model.safetensors"),
    "int8 weights": (lambda ck: rewrite_safetensors_header(ck / VAE_WEIGHTS, header_int8),
                     "diffusion_pytorch_model.safetensors"),
    "truncated weights": (lambda ck: truncate(ck / "text_encoder/model.safetensors"), "model.safetensors"),
    "missing shard": (lambda ck: (ck / "transformer/diffusion_pytorch_model-00003-of-00011.safetensors").unlink(),
                      "00003-of-00011"),
    "empty tokenizer folder": (lambda ck: [p.unlink() for p in (ck / "tokenizer").iterdir()], "tokenizer"),
    "tokenizer vocabulary that is not JSON": (lambda ck: (ck / "tokenizer/vocab.json").write_text("[1, 2"),
                                              "tokenizer"),
    "T5 tokenizer that is not JSON": (lambda ck: truncate(ck / "tokenizer_2/tokenizer.json"), "tokenizer_2"),
}


def corrupt_manifest(change):
    return lambda folder: edit_json(folder / "manifest.json", change)


def record(name: str, key: str, value):
    return corrupt_manifest(lambda m: m["components"][name].__setitem__(key, value))


def drop_sha(folder: Path) -> None:
    def change(m):
        fp = m["components"]["transformer"]["fingerprint"]
        for entry in (fp if isinstance(fp, list) else [fp]):
            entry.pop("sha256", None)

    edit_json(folder / "manifest.json", change)


# export-folder corruption -> (what it does to a copy of an export folder, text the error must contain)
EXPORT_CORRUPTIONS = {
    "none": (None, None),
    "manifest that is not JSON": (lambda f: (f / "manifest.json").write_text("{"), "manifest.json"),
    "missing manifest": (lambda f: (f / "manifest.json").unlink(), "manifest.json"),
    "edited VAE scale factor": (corrupt_manifest(lambda m: m["dims"].__setitem__("vae_scale_factor", 4)),
                                "vae_scale_factor"),
    "edited precision": (corrupt_manifest(lambda m: m.__setitem__("precision", "fp64")), "precision"),
    "fingerprint without sha256": (drop_sha, "sha256"),
    "graph path outside the folder": (record("clip", "file", "../clip.onnx"), "clip"),
    "truncated graph": (lambda f: truncate(f / "transformer.onnx"), "transformer.onnx"),
    "one byte changed": (lambda f: flip_byte(f / "vae_decoder.onnx"), "vae_decoder.onnx"),
    "swapped graphs": (lambda f: shutil.copyfile(f / "t5.onnx", f / "clip.onnx"), "clip.onnx"),
    "tokenizer that is not JSON": (lambda f: truncate(f / "tokenizer/tokenizer.json"), "tokenizer"),
    "VAE scaling factor of text": (
        lambda f: edit_json(f / "vae/config.json", lambda d: d.update(scaling_factor="abc")), "scaling_factor"),
    "scheduler shift that overflows": (
        lambda f: edit_json(f / "scheduler/scheduler_config.json", lambda d: d.update(max_shift=1000.0)),
        "shift"),
}


def corrupted_copy(folder: Path, root: Path, corruption: str) -> tuple[Path, str | None]:
    """A copy of export ``folder`` under ``root`` with ``corruption`` applied; the text its error must contain."""
    copy = root / "onnx"
    shutil.copytree(folder, copy)
    corrupt, needle = EXPORT_CORRUPTIONS[corruption]
    if corrupt:
        corrupt(copy)
    return copy, needle


def output_in(place: str, root: Path, src: Path, fresh: str) -> Path:
    """The output folder a draw names: a fresh one, the source itself, one inside the source, or a file."""
    out = {"fresh": root / fresh, "the source": src, "inside the source": src / fresh, "a file": root / "file"}[place]
    if place == "a file":
        out.write_text("mine")
    return out


def draw_corruption(table: dict | list):
    """No corruption half the time, else one of ``table``'s."""
    return st.one_of(st.just("none"), st.sampled_from(sorted(k for k in table if k != "none")))


# ---------------------------------------------------------------- tiny-model


@settings(PROPERTY, max_examples=10)
@given(variant=option(["dev", "schnell"], ["pro", ""]),
       seed=option([None, "0", "7", str(2**63 - 1)], ["-1", str(2**63), str(2**64), "x", "1.5"]),
       out_state=option(["fresh", "empty folder"], ["folder with a file", "a file"]))
@example(variant=(True, "schnell"), seed=(True, "7"), out_state=(True, "empty folder"))
def test_tiny_model(tmp_path_factory, variant, seed, out_state):
    root = tmp_path_factory.mktemp("tiny-model")
    out = root / "ck"
    state = out_state[1]
    if state == "empty folder":
        out.mkdir()
    elif state == "folder with a file":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif state == "a file":
        out.write_text("mine")
    before = tree_digest(out)
    code, stderr = run(["tiny-model", out, *flags({"--variant": variant, "--seed": seed})])
    bad = {}
    if not variant[0]:
        bad["variant"] = "--variant"
    if not seed[0]:
        bad["seed"] = "--seed"
    if not out_state[0]:
        bad["out"] = str(out)
    check_outcome(code, stderr, bad, "tiny-model")
    assert not leftovers(root) and not [p for p in root.iterdir() if p.name.startswith(".")], list(root.iterdir())
    if bad:
        assert tree_digest(out) == before
        return
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["guidance_embeds"] == (variant[1] == "dev")
    from fluxrt.export.checkpoint import Checkpoint

    assert Checkpoint.open(out).dims().variant == variant[1]


# ---------------------------------------------------------------- export


@settings(PROPERTY, max_examples=4)
@given(corruption=draw_corruption(CHECKPOINT_CORRUPTIONS),
       precision=option(["fp32", "fp16", "bf16"], ["fp64"]),
       components=option(["clip", "t5", "clip,t5"], ["clip,unet", ",", "vae_decoder"]),
       attention=option([None, "portable", "ort"], ["flash"]),
       out_place=option(["fresh"], ["the source", "inside the source", "a file"]))
@example(corruption="none", precision=(True, "fp16"), components=(True, "clip,t5"), attention=(True, None),
         out_place=(True, "fresh"))
@once_per_draw("tiny_checkpoints", "tmp_path_factory")
def test_export(tiny_checkpoints, tmp_path_factory, corruption, precision, components, attention, out_place):
    root = tmp_path_factory.mktemp("export")
    ck = root / "ck"
    shutil.copytree(tiny_checkpoints["dev"], ck)
    corrupt, needle = CHECKPOINT_CORRUPTIONS[corruption]
    if corrupt:
        corrupt(ck)
    out = {"fresh": root / "onnx", "the source": ck, "inside the source": ck / "onnx", "a file": root / "f"}[out_place[1]]
    if out_place[1] == "a file":
        out.write_text("mine")
    out_before = tree_digest(out)
    options = {"--precision": precision, "--components": components, "--attention": attention}
    if WEIGHTS_OF.get(corruption, "all") not in ("all", *components[1].split(",")):
        needle = None  # weights of a component not exported are not read
    bad = run_checked(["export", ck, "--out", out, *flags(options)], dict(options, **{"--out": out_place}),
                      corruption, needle, root, ck)
    if bad:
        assert tree_digest(out) == out_before, "a failed export left files in its output"
        return
    from fluxrt.artifacts import ExportFolder

    folder = ExportFolder.open(out)
    assert sorted(folder.manifest["components"]) == sorted(components[1].split(","))
    assert folder.precision == precision[1]


# ---------------------------------------------------------------- build

# what fluxrt build does not read: the scheduler, the tokenizers and the VAE's scaling (fp16 plans need no
# calibration; the VAE's latent scaling is the runtime's); and a folder of graphs without a manifest is one
# fluxrt did not write (Black Forest Labs' layout, each graph recognised by its tensors), which it builds
GRAPH_OF = {"truncated graph": "transformer", "one byte changed": "vae_decoder", "swapped graphs": "clip"}
BUILD_IGNORES = {"scheduler shift that overflows", "tokenizer that is not JSON", "VAE scaling factor of text",
                 "missing manifest"}


@settings(PROPERTY, max_examples=14)
@given(corruption=draw_corruption(EXPORT_CORRUPTIONS),
       draw=st.fixed_dictionaries({
           "--precision": option(["fp16"], ["bf16", "int8"]),
           "--batch": option([None, "1,1,2", "1"], ["0,1,2", "2,1,1", "a,b,c", "1,2"]),
           "--text-length": option([None, "1,16,64"], ["1,512,1000", "0,1,1", "16,8,32"]),
           "--image-side": option([None, "32,64,64"], ["30,64,64", "64,32,32", "0,16,16"]),
           "--optimization-level": option([None, "0", "3"], ["6", "-1", "x"]),
           "--compute-capability": option([None, "SM89"], ["SM999", "89"]),
           "--components": option(["clip", "clip,t5"], ["clip,unet", "vae"]),
       }),
       out_place=option(["fresh"], ["the source", "inside the source", "a file"]))
@example(corruption="none", draw={"--precision": (True, "fp16"), "--batch": (True, "1,1,2"),
                                   "--text-length": (True, "1,16,64"), "--image-side": (True, "32,64,64"),
                                   "--optimization-level": (True, "0"), "--compute-capability": (True, "SM89"),
                                   "--components": (True, "clip,t5")}, out_place=(True, "fresh"))
def test_build(half_exports, tmp_path_factory, corruption, draw, out_place):
    root = tmp_path_factory.mktemp("build")
    src, needle = corrupted_copy(half_exports["fp16"], root, corruption)
    out = output_in(out_place[1], root, src, "engines")
    if corruption in BUILD_IGNORES or GRAPH_OF.get(corruption, "all") not in ("all", *draw["--components"][1].split(",")):
        needle = None  # not read by this build: only the graphs it builds are
    bad = run_checked(["build", src, "--out", out, "--library", "tensorrt-rtx", *flags(draw)],
                      dict(draw, **{"--out": out_place}), corruption, needle, root, src)
    if bad:
        assert not out.is_dir() or out == src, "a failed build left an engine folder"
        return
    for name in draw["--components"][1].split(","):
        assert (out / f"{name}.plan").stat().st_size > 0
        sidecar = json.loads((out / f"{name}.plan.json").read_text())
        assert sidecar["precision"] == "fp16" and sidecar["component"] == name


# ---------------------------------------------------------------- quantize


@settings(PROPERTY, max_examples=8)
@given(corruption=draw_corruption(["edited precision", "truncated graph", "missing manifest",
                                   "tokenizer that is not JSON", "fingerprint without sha256"]),
       draw=st.fixed_dictionaries({
           "--calibration-prompts": option(["1"], ["0", "1000", "x"]),
           "--calibration-steps": option(["1"], ["0", "-2"]),
           "--calibration-size": option(["32"], ["40", "0"]),
           "--calibration-text-length": option(["16"], ["0", "1000"]),
       }),
       out_place=option(["fresh"], ["the source", "inside the source", "a file"]))
@example(corruption="none", draw={"--calibration-prompts": (True, "1"), "--calibration-steps": (True, "1"),
                                   "--calibration-size": (True, "32"), "--calibration-text-length": (True, "16")},
         out_place=(True, "fresh"))
def test_quantize(half_exports, tmp_path_factory, corruption, draw, out_place):
    root = tmp_path_factory.mktemp("quantize")
    src, needle = corrupted_copy(half_exports["fp16"], root, corruption)
    out = output_in(out_place[1], root, src, "fp8")
    bad = run_checked(["quantize", src, "--out", out, *flags(draw)], dict(draw, **{"--out": out_place}),
                      corruption, needle, root, src)
    if bad:
        assert not out.is_dir() or out == src, "a failed quantize left a folder"
        return
    from fluxrt.artifacts import ExportFolder

    folder = ExportFolder.open(out)
    assert folder.precision == "fp8" and folder.manifest["base_precision"] == "fp16"


# ---------------------------------------------------------------- generate


@settings(PROPERTY, max_examples=16)
@given(corruption=draw_corruption(EXPORT_CORRUPTIONS),
       draw=st.fixed_dictionaries({
           "--height": option(["32", "48"], ["33", "0"]),
           "--width": option(["32"], ["-16", "w"]),
           "--steps": option(["1"], ["0", "1001"]),
           "--max-sequence-length": option(["16"], ["513", "0"]),
           "--num-images": option([None, "2"], ["0"]),
           "--backend": option([None, "ort-cpu"], ["cuda-please"]),
       }),
       out_place=option(["fresh.png", "new/folder/img.png"], ["img.jpg", "a folder", "under a file"]),
       source=option(["--onnx"], ["--engines"]))
@example(corruption="none", draw={"--height": (True, "48"), "--width": (True, "32"), "--steps": (True, "1"),
                                   "--max-sequence-length": (True, "16"), "--num-images": (True, "2"),
                                   "--backend": (True, "ort-cpu")},
         out_place=(True, "new/folder/img.png"), source=(True, "--onnx"))
def test_generate(fp32_exports, tmp_path_factory, corruption, draw, out_place, source):
    root = tmp_path_factory.mktemp("generate")
    src, needle = corrupted_copy(fp32_exports["dev"], root, corruption)
    work = root / "work"
    work.mkdir()
    out = work / out_place[1]
    if out_place[1] == "a folder":
        out.mkdir()
    elif out_place[1] == "under a file":
        (work / "file").write_text("mine")
        out = work / "file" / "img.png"
    before = tree_digest(work)
    bad = run_checked(["generate", source[1], src, "--prompt", "a red fox", "--out", out, *flags(draw)],
                      dict(draw, **{"--out": out_place, "--engines": source}), corruption, needle, root, src)
    if bad:
        assert tree_digest(work) == before, "a failed generate left files"
        return
    from PIL import Image

    n = int(draw["--num-images"][1] or 1)
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}-{i}.png") for i in range(n)]
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (int(draw["--width"][1]), int(draw["--height"][1]))
            assert image.text["fluxrt:seed"] == "0"


# ---------------------------------------------------------------- bench


@settings(PROPERTY, max_examples=10)
@given(corruption=draw_corruption(["manifest that is not JSON", "truncated graph", "edited precision"]),
       runs=option([["a={src}:ort-cpu"], ["a={src}:ort-cpu", "b={src}:ort-cpu"]],
                   [["a={src}"], ["={src}:ort-cpu"], ["a={root}/nope:ort-cpu"], ["a={src}:warp"],
                    ["a={src}:ort-cpu", "a={src}:ort-cpu"]]),
       draw=st.fixed_dictionaries({
           "--height": option(["32"], ["33", "0"]),
           "--width": option(["32"], ["x"]),
           "--steps": option(["1"], ["0"]),
           "--text-length": option(["16"], ["0"]),
           "--batch": option(["1"], ["0"]),
           "--warmup": option(["0"], ["-1"]),
           "--iters": option(["1", "2"], ["0"]),
       }),
       out_place=option(["fresh"], ["a file"]))
@example(corruption="none", runs=(True, ["a={src}:ort-cpu", "b={src}:ort-cpu"]),
         draw={"--height": (True, "32"), "--width": (True, "32"), "--steps": (True, "1"), "--text-length": (True, "16"),
               "--batch": (True, "1"), "--warmup": (True, "0"), "--iters": (True, "2")}, out_place=(True, "fresh"))
def test_bench(fp32_exports, tmp_path_factory, corruption, runs, draw, out_place):
    root = tmp_path_factory.mktemp("bench")
    src, needle = corrupted_copy(fp32_exports["dev"], root, corruption)
    out = root / "report"
    if out_place[1] == "a file":
        out.write_text("mine")
    before = tree_digest(out)
    argv = ["bench", "--out", out, *flags(draw)]
    for spec in runs[1]:
        argv += ["--run", spec.format(src=src, root=root)]
    bad = run_checked(argv, dict(draw, **{"--run": runs, "--out": out_place}), corruption, needle, root, src)
    if bad:
        assert tree_digest(out) == before, "a failed bench left files"
        return
    report = json.loads((out / "bench.json").read_text())
    assert [r["label"] for r in report["runs"]] == [s.partition("=")[0] for s in runs[1]]
    assert (out / "bench.md").stat().st_size > 0 and (out / "bench.png").stat().st_size > 0
    for r in report["runs"]:
        assert np.isfinite(r["stages"]["generation"]["p50_ms"])


# ---------------------------------------------------------------- bench-synthetic


@pytest.mark.slow
@settings(PROPERTY, max_examples=5)
@example(draw={"--plan": (True, "transformer:1+1"), "--precisions": (True, "fp32"), "--modes": (True, "ort"),
               "--height": (True, "32"), "--width": (True, "32"), "--text": (True, "8"), "--iters": (True, "1")})
@given(draw=st.fixed_dictionaries({
    "--plan": option(["transformer:1+1", "vae"], ["transformer", "unet:1", "t5:x", "transformer:1+0", "clip:2"]),
    "--precisions": option(["fp32"], ["fp64", "fp32,int4"]),
    "--modes": option(["ort"], ["jit", "ort,"]),
    "--height": option(["32"], ["30", "0"]),
    "--width": option(["32"], ["-16", "x"]),
    "--text": option(["8"], ["0", "600"]),
    "--iters": option(["1"], ["0"]),
}))
def test_bench_synthetic(tmp_path_factory, monkeypatch, draw):
    """The synthetic benchmark on the tiny architecture on the CPU (its GPU runs are the H200's); the graphs
    are exported once for all draws (--reuse-exports)."""
    root = tmp_path_factory.mktemp("synthetic")
    monkeypatch.setenv("FLUXRT_BENCH_WORK", str(tmp_path_factory.getbasetemp() / "synthetic-work"))
    out = root / "report"
    argv = ["bench-synthetic", "--out", out, "--model", "tiny", "--device", "cpu", "--warmup", "0",
            "--attention", "portable", "--reuse-exports", *flags(draw)]
    try:
        code, stderr = run(argv)
    finally:
        from fluxrt.bench import synthetic

        synthetic.use_model("flux-dev")
    bad = faults(draw)
    check_outcome(code, stderr, bad, "bench-synthetic")
    if bad:
        assert not out.exists()
        return
    data = json.loads((out / "results.json").read_text())
    rows = [r for r in data["measurements"] if "p50_ms" in r]
    assert rows and all(np.isfinite(r["p50_ms"]) for r in rows), data["measurements"]
