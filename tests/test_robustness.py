"""Hard inputs, failing stages and concurrent use of one pipeline, on the tiny model with ONNX Runtime (CPU).

Every invalid parameter is an InvalidInputError naming the parameter, raised before any stage runs; a
stage that produces NaN/Inf is a NumericError naming the stage; a failed call leaves the pipeline usable;
threads and long runs give the images and memory use of sequential short ones.  A property-based test
drives the API and the CLI with random parameter combinations, valid and invalid.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxrt.artifacts import EngineFolder, ExportFolder, check_envelope, graph_fingerprint
from fluxrt.cli import main
from fluxrt.components import STAGES, ShapeEnvelope, component_spec
from fluxrt.errors import EngineError, ExportError, InvalidInputError, NumericError
from fluxrt.runner import Runner
from fluxrt.runtime import FluxPipeline
from fluxrt.runtime.ort import OrtRunner

FAST = dict(height=32, width=32, num_inference_steps=1, max_sequence_length=16)


@contextlib.contextmanager
def quiet():
    """schnell's ignored guidance and over-long prompts warn; these tests are about errors, not warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Wrapped(Runner):
    """Delegates to another runner, counts its calls, and applies ``fault`` (once) to the outputs."""

    def __init__(self, inner: Runner):
        super().__init__(inner.spec, inner.precision)
        self.inner, self.backend, self.device = inner, inner.backend, inner.device
        self.calls = 0
        self.fault = None

    def _activate(self) -> None:
        self.inner.activate()

    def _infer(self, feed):
        self.calls += 1
        out = self.inner.infer(feed)
        fault, self.fault = self.fault, None
        return fault(out) if fault is not None else out


def ort_runners(folder: ExportFolder) -> dict[str, Wrapped]:
    return {s: Wrapped(OrtRunner(folder.spec(s), folder.graph_precision(s), folder.graph_path(s))) for s in STAGES}


@pytest.fixture(scope="module")
def pipes(fp32_exports) -> dict[str, FluxPipeline]:
    return {v: FluxPipeline(ExportFolder.open(fp32_exports[v]), ort_runners(ExportFolder.open(fp32_exports[v])))
            for v in ("dev", "schnell")}


def stage_calls(pipe: FluxPipeline) -> int:
    return sum(r.calls for r in pipe.runners.values())


# ---- hard inputs ---------------------------------------------------------------------------------

def latents(shape, dtype=np.float32, fill=None):
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    if fill is not None:
        x.reshape(-1)[:3] = fill
    return x


@pytest.mark.parametrize("kwargs,message", [
    (dict(height=-16), "height must be a positive multiple of 16 pixels, got -16"),
    (dict(width=32.0), "width must be a positive multiple of 16 pixels, got 32.0"),
    (dict(height="32"), "height must be a positive multiple of 16 pixels, got '32'"),
    (dict(num_inference_steps=1001), r"num_inference_steps must be an integer in \[1, 1000\], got 1001"),
    (dict(num_inference_steps=10**12), r"num_inference_steps must be an integer in \[1, 1000\], got 1000000000000"),
    (dict(num_inference_steps=True), r"num_inference_steps must be an integer in \[1, 1000\], got True"),
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number, got inf"),
    (dict(guidance_scale=1e300), r"guidance_scale must be a finite number, got 1e\+300 \(float32"),
    (dict(guidance_scale=10**400), "guidance_scale must be a finite number, got 1000"),
    (dict(guidance_scale="3.5"), "guidance_scale must be a finite number, got '3.5'"),
    (dict(seed=2**64), r"seed must be an integer in \[0, 2\*\*64 - 1\], got 18446744073709551616"),
    (dict(seed=1.5), r"seed must be an integer in \[0, 2\*\*64 - 1\], got 1.5"),
    (dict(max_sequence_length=0), r"max_sequence_length must be an integer in \[1, 512\], got 0"),
    (dict(prompt=[]), "prompt must be a string or a non-empty list of strings, got \\[\\]"),
    (dict(prompt=["a", 3]), "prompt must be a string or a non-empty list of strings"),
    (dict(prompt=None), "prompt must be a string or a non-empty list of strings, got None"),
    (dict(latents=latents((1, 4, 64), np.int32)), "latents have dtype int32, expected a floating dtype"),
    (dict(latents=latents((1, 4, 64), bool)), "latents have dtype bool, expected a floating dtype"),
    (dict(latents=latents((1, 4, 64), np.complex64)), "latents have dtype complex64, expected a floating dtype"),
    (dict(latents=latents((1, 4, 64), fill=np.nan)), "latents contain NaN or Inf"),
    (dict(latents=latents((1, 4, 64), np.float64, fill=1e300)), "latents contain NaN or Inf"),  # inf in float32
    (dict(latents=latents((2, 4, 64))), r"latents have shape \(2, 4, 64\), expected \(1, 4, 64\)"),
    (dict(latents=[[0.0] * 64] * 4), r"latents must be a numpy \(or cupy\) array of shape \(1, 4, 64\), got list"),
])
def test_invalid_parameters_fail_before_any_stage(pipes, kwargs, message):
    pipe = pipes["dev"]
    before = stage_calls(pipe)
    with pytest.raises(InvalidInputError, match=message):
        pipe(**dict(dict(prompt="a", **FAST), **kwargs))
    assert stage_calls(pipe) == before  # refused before CLIP, T5, the transformer or the VAE ran


def test_envelope_check_names_the_range():
    env = ShapeEnvelope(batch=(1, 1, 2), text_length=(8, 16, 32), image_side=(32, 32, 64))
    check_envelope(env, 2, 32, 64, 8)
    for args, message in [
        ((1, 80, 32, 16), r"height 80 is outside the engines' range 32..64 pixels \(the envelope they were built"),
        ((1, 32, 16, 16), "width 16 is outside the engines' range 32..64 pixels"),
        ((3, 32, 32, 16), r"batch \(prompts x num_images_per_prompt\) 3 is outside the engines' range 1..2"),
        ((1, 32, 32, 64), "max_sequence_length 64 is outside the engines' range 8..32 tokens"),
        ((1, 32, 32, 4), "max_sequence_length 4 is outside the engines' range 8..32 tokens"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            check_envelope(env, *args)


def test_engine_folder_envelope_is_checked_before_any_stage(fp32_exports):
    """An engine folder's envelope, read by the pipeline; the stages are ONNX Runtime here (plans cannot
    execute without a GPU), which shows the check happens in the pipeline, not in a TensorRT runner."""
    export = ExportFolder.open(fp32_exports["dev"])
    envelope = {"batch": [1, 1, 2], "text_length": [1, 16, 32], "image_side": [32, 32, 48]}
    folder = EngineFolder(export.root, {"envelope": envelope, "precision": "fp16"}, export.dims)
    pipe = FluxPipeline(folder, ort_runners(export))
    assert pipe("a", height=48, width=32, num_inference_steps=1, max_sequence_length=32, num_images_per_prompt=2,
                output_type="np").images.shape == (2, 48, 32, 3)
    calls = stage_calls(pipe)
    for kwargs, message in [
        (dict(height=64), "height 64 is outside the engines' range 32..48 pixels"),
        (dict(width=16), "width 16 is outside the engines' range 32..48 pixels"),
        (dict(num_images_per_prompt=3), r"batch \(prompts x num_images_per_prompt\) 3 is outside the engines' "
                                        r"range 1..2"),
        (dict(prompt=["a", "b", "c"]), r"batch \(prompts x num_images_per_prompt\) 3 is outside"),
        (dict(max_sequence_length=None), "max_sequence_length 512 is outside the engines' range 1..32 tokens"),
        (dict(height=None), "height 1024 is outside the engines' range 32..48 pixels"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            pipe(**dict(dict(prompt="a", **FAST), **kwargs))
    assert stage_calls(pipe) == calls


def test_swapped_graphs_are_refused(fp32_exports, tmp_path):
    import json

    folder = Path(shutil.copytree(fp32_exports["dev"], tmp_path / "export"))
    for a, b in (("clip", "t5"), ("transformer", "vae_decoder")):
        (folder / f"{a}.onnx").rename(folder / "tmp.onnx")
        (folder / f"{b}.onnx").rename(folder / f"{a}.onnx")
        (folder / "tmp.onnx").rename(folder / f"{b}.onnx")
    with pytest.raises(ExportError, match=r"clip graph: .*clip.onnx is not the file that was recorded "
                                          r"\(sha256 [0-9a-f]{12}\.\.\., expected [0-9a-f]{12}\.\.\.\): swapped"):
        FluxPipeline.load(folder)
    # a manifest that agrees with the swapped files: the runner's I/O check still tells the graphs apart
    # (CLIP and T5 share their input name, not their outputs)
    manifest = json.loads((folder / "manifest.json").read_text())
    for a, b in (("clip", "t5"), ("transformer", "vae_decoder")):
        for record in (manifest["components"][a], manifest["components"][b]):
            record["fingerprint"] = graph_fingerprint(folder / record["file"])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=r"clip: .*clip.onnx has inputs \['input_ids'\] and outputs "
                                          r"\['text_embeddings'\], expected .*\(is it the clip graph\?\)"):
        FluxPipeline.load(folder)
    with pytest.raises(EngineError, match=r"transformer: .*transformer.onnx has inputs \['latent'\] and outputs "
                                          r"\['images'\], expected \['hidden_states', .*\(is it the transformer"):
        OrtRunner(component_spec("transformer", ExportFolder.open(folder).dims), "fp32",
                  folder / "transformer.onnx").activate()
    (folder / "t5.onnx").write_bytes((folder / "t5.onnx").read_bytes()[:1000])  # truncated
    with pytest.raises(ExportError, match="t5 graph: .* is not the file that was recorded"):
        FluxPipeline.load(folder, backend={"t5": "ort-cpu"})


def test_folder_that_is_neither_export_nor_engines(tmp_path):
    with pytest.raises(ExportError, match="is neither an export folder .* nor an engine folder"):
        FluxPipeline.load(tmp_path)
    with pytest.raises(ExportError, match="export folder .*absent does not exist"):
        FluxPipeline.load(tmp_path / "absent")


# ---- failing stages ------------------------------------------------------------------------------

def nan_graph(path: Path) -> Path:
    """A graph with the VAE decoder's input and output names whose output is 0/0: NaN everywhere."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["B", 16, "h", "w"])
    y = helper.make_tensor_value_info("images", TensorProto.FLOAT, None)
    consts = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("start", 0), ("end", 3), ("axis", 1))]
    consts.append(helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 8, 8]))
    nodes = [helper.make_node("Sub", ["latent", "latent"], ["zero"]),  # [B, 3, 8h, 8w] like the decoder's images
             helper.make_node("Slice", ["zero", "start", "end", "axis"], ["rgb"]),
             helper.make_node("Resize", ["rgb", "", "scales"], ["big"], mode="nearest"),
             helper.make_node("Div", ["big", "big"], ["images"])]
    model = helper.make_model(helper.make_graph(nodes, "nan", [x], [y], consts),
                              opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_nan_from_a_graph_is_a_numeric_error(fp32_exports, tmp_path):
    export = ExportFolder.open(fp32_exports["dev"])
    runners = ort_runners(export)
    runners["vae_decoder"] = OrtRunner(export.spec("vae_decoder"), "fp32", nan_graph(tmp_path / "nan.onnx"))
    pipe = FluxPipeline(export, runners)
    with pytest.raises(NumericError, match=r"stage vae_decoder \(ort-cpu, fp32\) produced NaN or Inf in 'images'"):
        pipe("a", **FAST)


@pytest.mark.parametrize("stage,fault,error", [
    ("transformer", lambda out: {k: np.full_like(v, np.inf) for k, v in out.items()},
     r"stage transformer \(ort-cpu, fp32\) produced NaN or Inf in 'latent'"),
    ("t5", lambda out: {k: v * np.nan for k, v in out.items()}, r"stage t5 \(ort-cpu, fp32\) produced NaN"),
    # an exception inside a runner: an EngineError naming the stage, the backend and the library's message
    ("clip", lambda out: 1 / 0, r"clip \(ort-cpu\): running failed: division by zero"),
])
def test_failed_generation_leaves_the_pipeline_usable(pipes, fp32_exports, stage, fault, error):
    pipe = pipes["dev"]
    args = dict(prompt="a koi pond", seed=3, output_type="np", **dict(FAST, num_inference_steps=2))
    pipe.runners[stage].fault = fault
    with pytest.raises((NumericError, EngineError), match=error):
        pipe(**args)
    fresh = FluxPipeline.load(fp32_exports["dev"])(**args).images
    np.testing.assert_array_equal(pipe(**args).images, fresh)


# ---- concurrency and endurance -------------------------------------------------------------------

CALLS = [dict(prompt=p, seed=s, height=h, width=w, num_inference_steps=k, num_images_per_prompt=n,
              max_sequence_length=m, output_type="np")
         for p, s, h, w, k, n, m in [
             ("a fox", 0, 32, 32, 1, 1, 16), ("a lighthouse at dawn", 1, 48, 32, 2, 2, 24),
             (["two cats", "a dog"], 2, 32, 48, 1, 1, 16), ("", 3, 16, 16, 3, 1, 8),
             ("Ünïcödé façade 東京 🙂", 4, 64, 32, 2, 1, 32), ("a fox", 5, 32, 32, 1, 2, 16),
             ("a red boat " * 40, 6, 32, 32, 2, 1, 77), ("koi", 2**64 - 1, 16, 48, 1, 1, 1)]]


def test_threads_give_the_sequential_images(pipes):
    """One loaded pipeline called from 8 threads at once: the same images as the same calls in sequence
    (nothing per call is kept on the pipeline or its runners; ORT sessions and tokenizers are thread-safe)."""
    pipe = pipes["dev"]
    with quiet():
        want = [pipe(**c).images for c in CALLS]
        got, errors = [None] * len(CALLS), []
        start = threading.Barrier(len(CALLS))

        def work(i: int) -> None:
            try:
                start.wait()
                for _ in range(3):
                    got[i] = pipe(**CALLS[i]).images
            except BaseException as e:  # reported below, with the call that raised it
                errors.append((i, e))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(CALLS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(g, w, err_msg=f"call {i} from a thread")


def rss_mib() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# A leak of one 32x32 float32 image per call (12 KiB) grows traced memory by 1.2 MiB over 100 calls: the
# bound is half that. numpy reports its buffers to tracemalloc, so this is exact for host arrays;
# resident memory (ONNX Runtime's own allocations included) gets a looser bound of its own.
TRACED_GROWTH_MIB = 0.6
RSS_GROWTH_MIB = 4.0


def traced_growth_mib(pipe, calls: int, skip: int, keep: list | None = None) -> float:
    """Traced host memory growth over ``calls`` calls after ``skip`` warm-up calls; ``keep`` holds on to
    every output (a deliberate leak, to show the measurement sees one)."""
    import tracemalloc

    for i in range(skip):
        pipe(f"a fox number {i}", seed=i, output_type="np", **FAST)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(calls):
            out = pipe(f"a fox number {skip + i}", seed=skip + i, output_type="np", **FAST)
            if keep is not None:
                keep.append(out.images)
        return (tracemalloc.get_traced_memory()[0] - before) / 2**20
    finally:
        tracemalloc.stop()


def test_traced_memory_sees_a_leak_of_one_image_per_call(pipes):
    """The measurement below can fail: holding on to each call's image shows as its size times the calls."""
    growth = traced_growth_mib(pipes["schnell"], 20, 2, keep=[])
    assert growth > 20 * 32 * 32 * 3 * 4 / 2**20 * 0.9, growth


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc/self/statm (Linux)")
def test_memory_settles_over_200_generations(pipes):
    pipe = pipes["schnell"]
    rss = []
    for i in range(100):
        pipe(f"a fox number {i}", seed=i, output_type="pil", **FAST)
        rss.append(rss_mib())
    traced = traced_growth_mib(pipe, 100, 0)
    growth = rss_mib() - rss[-1]
    print(f"\nRSS after calls 1/100/200: {rss[0]:.1f} / {rss[-1]:.1f} / {rss[-1] + growth:.1f} MiB; over the last "
          f"100: resident {growth:+.2f} MiB, traced {traced:+.3f} MiB")
    assert traced < TRACED_GROWTH_MIB
    assert growth < RSS_GROWTH_MIB, rss[::20]


# ---- property-based: random parameter combinations through the API and the CLI -------------------

def choice(valid, invalid):
    return st.one_of(st.tuples(st.just(True), valid), st.tuples(st.just(False), invalid))


PARAMS = {
    "prompt": choice(st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), min_size=1, max_size=2)),
                     st.sampled_from([None, [], 5, b"bytes", ["a", None]])),
    "height": choice(st.sampled_from([16, 32, 48, np.int64(32)]), st.sampled_from([0, -16, 8, 33, 32.0, "32", True])),
    "width": choice(st.sampled_from([16, 32, 48]), st.sampled_from([0, -32, 24, 1.5e3, "48"])),
    "num_inference_steps": choice(st.integers(1, 3), st.sampled_from([0, -1, 1001, 10**12, 2.0, "3", False])),
    "guidance_scale": choice(st.one_of(st.none(), st.floats(-1e30, 1e30, allow_nan=False), st.integers(-100, 100)),
                             st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300, -1e39, "3.5",
                                              True, 10**40])),
    "max_sequence_length": choice(st.integers(1, 80), st.sampled_from([0, -5, 513, 16.0, "16"])),
    "num_images_per_prompt": choice(st.integers(1, 2), st.sampled_from([0, -1, 1.0, True])),
    "seed": choice(st.one_of(st.none(), st.integers(0, 2**64 - 1)),
                   st.sampled_from([-1, 2**64, 1.5, "0", True])),
    "output_type": choice(st.sampled_from(["np", "pil"]), st.sampled_from(["latent", None])),
    "latents": st.sampled_from([None, None, None, "ok", "nan", "int", "wrong"]),
}


def invalid_names(draw: dict, variant: str) -> set[str]:
    bad = {k for k, v in draw.items() if k != "latents" and not v[0]}
    if variant == "schnell":
        bad.discard("guidance_scale")  # schnell warns and ignores any guidance
    if draw["latents"] in ("nan", "int", "wrong") and not bad & {"prompt", "height", "width", "num_images_per_prompt"}:
        bad.add("latents")
    return bad


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(variant=st.sampled_from(["dev", "schnell"]), draw=st.fixed_dictionaries(PARAMS))
def test_api_random_parameters(pipes, variant, draw):
    pipe = pipes[variant]
    kwargs = {k: v[1] for k, v in draw.items() if k != "latents"}
    bad = invalid_names(draw, variant)
    prompts = [kwargs["prompt"]] if isinstance(kwargs["prompt"], str) else kwargs["prompt"]
    if draw["latents"] and not bad & {"prompt", "height", "width", "num_images_per_prompt"}:
        batch, n = len(prompts) * kwargs["num_images_per_prompt"], (kwargs["height"] // 16) * (kwargs["width"] // 16)
        kwargs["latents"] = {"ok": latents((batch, n, 64)), "nan": latents((batch, n, 64), fill=np.nan),
                             "int": latents((batch, n, 64), np.int64), "wrong": latents((batch, n + 1, 64))}[draw["latents"]]
    before = stage_calls(pipe)
    with quiet():
        if bad:
            with pytest.raises(InvalidInputError) as e:
                pipe(**kwargs)
            assert any(str(e.value).startswith(name) for name in bad), (bad, str(e.value))
            assert stage_calls(pipe) == before
            return
        out = pipe(**kwargs)
    batch = len(prompts) * kwargs["num_images_per_prompt"]
    if kwargs["output_type"] == "np":
        assert out.images.shape == (batch, kwargs["height"], kwargs["width"], 3)
        assert np.isfinite(out.images).all() and out.images.min() >= 0 and out.images.max() <= 1
    else:
        assert [im.size for im in out.images] == [(kwargs["width"], kwargs["height"])] * batch


CLI_PARAMS = {  # flag: (valid values, invalid values); None leaves the flag out
    "--height": (["16", "32"], ["0", "-16", "33", "abc", "1e3"]),
    "--width": (["16", "48"], ["8", "-32", "x"]),
    "--steps": ([None, "1", "2"], ["0", "1001", "1.5"]),
    "--guidance": ([None, "3.5", "-2", "0"], ["nan", "inf", "1e300", "abc"]),
    "--seed": (["0", str(2**64 - 1)], ["-1", str(2**64), "1.5"]),
    "--max-sequence-length": (["1", "16"], ["0", "513", "x"]),
    "--num-images": (["1", "2"], ["0", "-1", "two"]),
    "--out": (["img.png"], ["img.jpg"]),
}
CLI_NAMES = {f: f for f in ("--height", "--width", "--steps", "--guidance", "--seed", "--max-sequence-length",
                             "--num-images", "--out")}  # the CLI names its flags


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), quiet():
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: a value of the wrong type
            code = e.code
    return code, err.getvalue()


@settings(max_examples=16, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(draw=st.fixed_dictionaries({flag: choice(st.sampled_from(ok), st.sampled_from(bad))
                                   for flag, (ok, bad) in CLI_PARAMS.items()}),
       prompt=st.text(max_size=20).filter(lambda p: not p.startswith("-")))
def test_cli_random_parameters(fp32_exports, tmp_path_factory, draw, prompt):
    out_dir = tmp_path_factory.mktemp("cli")
    argv = ["generate", "--onnx", str(fp32_exports["dev"]), "--prompt", prompt]
    for flag, (_, value) in draw.items():
        if value is not None:
            argv += [flag, str(out_dir / value) if flag == "--out" else value]
    code, stderr = run_cli(argv)
    bad = [flag for flag, (ok, _) in draw.items() if not ok]
    assert "Traceback" not in stderr
    if not bad:
        assert code == 0, stderr
        n = int(draw["--num-images"][1])
        assert len(list(out_dir.glob("*.png"))) == n
        return
    assert code == 2 and not list(out_dir.glob("*.png")), stderr
    lines = stderr.strip().splitlines()
    named = [f for f in bad if f"argument {f}: invalid" in lines[-1] or f"error: {CLI_NAMES[f]} " in lines[-1]]
    assert named, (bad, stderr)
    assert len(lines) == 1 or lines[0].startswith("usage:"), stderr  # ours: one line; argparse's: usage, then one
