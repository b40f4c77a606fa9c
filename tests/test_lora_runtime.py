"""LoRA without re-export (``FluxPipeline.load_lora`` / ``unload_lora``, runtime/lora.py) and merged at export
(``fluxrt export --lora``): images against diffusers' ``load_lora_weights`` + ``set_adapters`` on the tiny model
for peft LoRAs (ranks, alphas, patterns, fp32/bf16/fp16 files) and a kohya file; load and unload sequences bit
for bit against fresh pipelines; every linear found in each attention mode's graph; the error messages."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from child_process import Child
from fluxrt.artifacts import ExportFolder
from fluxrt.cli import main
from fluxrt.errors import CheckpointError, ExportError, InvalidInputError
from fluxrt.lora import read_lora, transformer_linears
from fluxrt.runtime import FluxPipeline
from fluxrt.runtime.lora import SplitSlot, graph_linears, weight_reader

pytest.importorskip("peft")
from test_lora import kohya_file, peft_lora, peft_pair, save  # noqa: E402  (the LoRA makers of test_lora)

IMAGE_TOL = 2e-3  # fluxrt with a LoRA vs diffusers with the same adapters, images in [0, 1]
CALL = dict(prompt=["a red fox in the snow"], height=48, width=64, num_inference_steps=2, max_sequence_length=16,
            guidance_scale=3.5, output_type="np")
LATENTS = np.random.default_rng(0).standard_normal((1, 12, 64)).astype(np.float32)
SINGLE_PROJ_OUT = ["single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out"]
EXPORT_KERNELS = ("import sys; from fluxrt.export.checkpoint import Checkpoint; "
                  "from fluxrt.export.onnx_export import ExportRequest, export_checkpoint; "
                  "export_checkpoint(Checkpoint.open(sys.argv[1]), sys.argv[2], "
                  "ExportRequest(('transformer',), 'bf16', attention='ort-kernels', external_data_bytes=0))")


def images(pipe) -> np.ndarray:
    return pipe(latents=LATENTS, **CALL).images


@pytest.fixture(scope="module")
def theirs(tiny_checkpoints):
    from diffusers import FluxPipeline as DiffusersFlux

    return DiffusersFlux.from_pretrained(tiny_checkpoints["dev"], dtype=torch.float32, local_files_only=True)


@pytest.fixture(scope="module")
def config(fp32_exports):
    return ExportFolder.open(fp32_exports["dev"]).transformer_config()


@pytest.fixture(scope="module")
def loras(theirs, config, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("loras")
    return {
        "attn": peft_lora(theirs, root / "attn.safetensors", ["to_q", "to_k", "to_v", "to_out.0", "proj_out",
                                                               "norm1.linear"], 4, 8, torch.float32),
        "mlp-bf16": peft_lora(theirs, root / "mlp.safetensors", ["add_q_proj", "ff.net.2", "proj_mlp", "x_embedder"],
                              2, 3, torch.bfloat16, rank_pattern={"proj_mlp": 3}, seed=1),
        "ctx-fp16": peft_lora(theirs, root / "ctx.safetensors", ["ff_context.net.0.proj", "norm.linear",
                                                                  "to_add_out", "context_embedder"],
                              3, 6, torch.float16, rslora=True, seed=2),
        "kohya": kohya_file(root / "kohya.safetensors", config, alpha=16.0),
    }


@pytest.fixture(scope="module")
def their_base(theirs) -> np.ndarray:
    return theirs(latents=torch.from_numpy(LATENTS), **CALL).images


@pytest.fixture(scope="module")
def ours(fp32_exports):
    """One pipeline for the tests that load and unload in turn (each leaves it with no LoRA)."""
    return FluxPipeline.load(fp32_exports["dev"], backend="ort-cpu")


@pytest.fixture(scope="module")
def base(ours) -> np.ndarray:
    return images(ours)


def diffusers_images(pipe, files: list) -> np.ndarray:
    names = [f"a{i}" for i in range(len(files))]
    for name, (path, _) in zip(names, files):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, [scale for _, scale in files])
    try:
        return pipe(latents=torch.from_numpy(LATENTS), **CALL).images
    finally:
        pipe.unload_lora_weights()


@pytest.mark.parametrize("case", [[("attn", 1.0)], [("mlp-bf16", 0.7), ("ctx-fp16", 1.3)], [("kohya", 0.8)]],
                         ids=["peft-fp32", "peft-bf16+fp16", "kohya"])
def test_images_equal_diffusers_adapters(theirs, their_base, ours, base, loras, case):
    files = [(loras[key], scale) for key, scale in case]
    want = diffusers_images(theirs, files)
    for path, scale in files:
        ours.load_lora(path, scale)
    try:
        got = images(ours)
    finally:
        ours.unload_lora()
    assert np.abs(base - their_base).max() < 2e-4
    assert np.abs(got - want).max() < IMAGE_TOL
    assert np.abs(want - their_base).max() > 50 * IMAGE_TOL  # the LoRA changes the image far beyond the tolerance


def test_loads_and_unloads_equal_fresh_pipelines_bit_for_bit(fp32_exports, ours, base, loras):
    a, b = loras["attn"], loras["kohya"]
    try:
        first, second = ours.load_lora(a, 0.9), ours.load_lora(b, 0.6)
        ours.unload_lora(first)
        assert list(ours.loras) == [second]
        only_b = images(ours)
        assert np.array_equal(only_b, images(FluxPipeline.load(fp32_exports["dev"], loras=[(b, 0.6)])))
        assert np.abs(only_b - base).max() > 0.1
        third = ours.load_lora(a, 0.9)  # now b, then a
        assert len({first, second, third}) == 3 and all({first, second, third})
        b_then_a = images(ours)
        assert np.array_equal(b_then_a, images(FluxPipeline.load(fp32_exports["dev"], loras=[(b, 0.6), (a, 0.9)])))
        ours.unload_lora()
        assert ours.loras == {}
        assert np.array_equal(images(ours), base)
        assert ours.runners["transformer"]._weights == {}  # a session without overrides
    finally:
        ours.unload_lora()


def test_the_same_file_twice_stacks(ours, base, loras):
    try:
        names = [ours.load_lora(loras["attn"], 0.5), ours.load_lora(loras["attn"], 0.5)]
        twice = images(ours)
        ours.unload_lora()
        ours.load_lora(loras["attn"], 1.0)
        once = images(ours)
    finally:
        ours.unload_lora()
    assert names[0] != names[1]
    assert np.abs(twice - once).max() < 1e-5 and np.abs(once - base).max() > 0.1


@pytest.fixture(scope="module")
def variant_exports(tiny_checkpoints, fp32_exports, loras, tmp_path_factory) -> dict:
    """An fp32 ``--attention ort`` transformer with two LoRAs merged (the export's ``--lora``, into a copy of the
    fp32 export) and a bf16 ``--attention ort-kernels`` one, side by side; both keep their weights in external data."""
    from fluxrt.export.checkpoint import Checkpoint
    from fluxrt.export.onnx_export import ExportRequest, export_checkpoint

    root = tmp_path_factory.mktemp("lora-exports")
    merged = root / "ort-fp32-lora"
    shutil.copytree(fp32_exports["dev"], merged)
    with Child(EXPORT_KERNELS, tiny_checkpoints["dev"], root / "kernels") as kernels:
        export_checkpoint(Checkpoint.open(tiny_checkpoints["dev"]), merged, ExportRequest(
            ("transformer",), "fp32", attention="ort", external_data_bytes=0,
            loras=((str(loras["attn"]), 0.8), (str(loras["kohya"]), 1.0))))
        kernels.wait()
    return {"ort-fp32-lora": merged, "ort-kernels-bf16": root / "kernels"}


@pytest.fixture(scope="module")
def graphs(fp32_exports, half_exports, variant_exports) -> dict:
    folders = {"portable-fp32": fp32_exports["dev"], "portable-fp16": half_exports["fp16"],
               "portable-bf16": half_exports["bf16"], **variant_exports}
    return {name: folder / "transformer.onnx" for name, folder in folders.items()}


GRAPH_DTYPES = {"portable-fp32": "float32", "portable-fp16": "float16", "portable-bf16": "bfloat16",
                "ort-fp32-lora": "float32", "ort-kernels-bf16": "bfloat16"}
EXTERNAL = ("ort-fp32-lora", "ort-kernels-bf16")


@pytest.mark.parametrize("name", sorted(GRAPH_DTYPES))
def test_every_linear_is_found_in_each_graph(graphs, config, name):
    found = graph_linears(graphs[name])
    assert found.shapes == transformer_linears(config)
    assert sorted({**found.slots, **found.fixed}) == sorted(found.shapes)
    assert {s.dtype for s in found.slots.values()} == {GRAPH_DTYPES[name]}
    assert all(((s.attn if isinstance(s, SplitSlot) else s).external is not None) == (name in EXTERNAL)
               for s in found.slots.values())
    assert found.fixed == {}
    # ort-kernels: proj_out split in two, to_v's bias folded into its bias and recorded beside it
    assert sorted(m for m, s in found.slots.items() if isinstance(s, SplitSlot)) == \
        (SINGLE_PROJ_OUT if "kernels" in name else [])


@pytest.mark.parametrize("precision,rtol", [("fp16", 2**-10), ("bf16", 2**-7)])
def test_half_precision_merge_equals_torch(tiny_checkpoints, half_exports, config, loras, precision, rtol):
    """The merged initializers of a half-precision graph against the same merge in torch, from diffusers' own
    module in that precision (to one rounding of the dtype: the low-rank products may differ in float32's last bit)."""
    from diffusers import FluxTransformer2DModel

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    model = FluxTransformer2DModel.from_pretrained(tiny_checkpoints["dev"] / "transformer", torch_dtype=dtype)
    files = [(read_lora(loras["mlp-bf16"], config), 0.7), (read_lora(loras["ctx-fp16"], config), 1.3)]
    found = graph_linears(half_exports[precision] / "transformer.onnx")
    merged = found.merged(files)
    modules = sorted({m for lora, _ in files for m in lora.deltas})
    assert len(merged) == len(modules) > 10
    for module in modules:
        slot = found.slots[module]
        w = model.get_submodule(module).weight.detach()
        want = w.float()
        for lora, scale in files:
            if module in lora.deltas:
                d = lora.deltas[module]
                want = want + scale * d.multiplier * (torch.from_numpy(d.up) @ torch.from_numpy(d.down))
        got = merged[slot.initializer].astype(np.float32)
        got = got.T if slot.transposed else got
        want = want.to(dtype).float().numpy()
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max() / 64, err_msg=module)
        assert not np.array_equal(got, w.float().numpy()), module


def test_fp16_graph_runs_with_its_merged_weights(fp32_exports, half_exports, loras):
    want = images(FluxPipeline.load(fp32_exports["dev"], loras=[(loras["ctx-fp16"], 1.3)]))
    pipe = FluxPipeline.load(half_exports["fp16"])
    plain = images(pipe)
    pipe.load_lora(loras["ctx-fp16"], 1.3)
    got = images(pipe)
    assert np.abs(got - want).max() < 0.03 and np.abs(got - plain).max() > 0.3  # fp16 is 0.011 from fp32 here


def test_weights_in_external_data_reach_the_session(variant_exports, loras, tmp_path):
    """On a graph whose weights live in external data (given to ONNX Runtime as external initializers), a LoRA
    gives the images of the same graph with the merged weights written into it."""
    import onnx
    from onnx import numpy_helper

    from fluxrt.runtime.ort import OrtRunner

    folder = ExportFolder.open(variant_exports["ort-fp32-lora"])
    pipe = FluxPipeline.load(folder.root)
    plain = images(pipe)
    pipe.load_lora(loras["mlp-bf16"], 0.7)
    got = images(pipe)
    merged = pipe.runners["transformer"].linears().merged([(lora, s) for lora, s in pipe.loras.values()])
    model = onnx.load(str(folder.graph_path("transformer")))
    for tensor in model.graph.initializer:
        if tensor.name in merged:
            tensor.CopyFrom(numpy_helper.from_array(merged[tensor.name], tensor.name))
    onnx.save(model, str(tmp_path / "merged.onnx"))
    runner = OrtRunner(folder.spec("transformer"), "fp32", tmp_path / "merged.onnx")
    want = images(FluxPipeline.load(folder.root, runners={"transformer": runner}))
    assert np.array_equal(got, want) and np.abs(got - plain).max() > 0.1


def test_export_merges_as_the_runtime_does_and_records_the_files(variant_exports, fp32_exports, config, loras):
    """``fluxrt export --lora`` writes, bit for bit, the weights the runtime merges into the plain export; the
    manifest names each file with its sha256 and scale; the torch reference backend merges the same files."""
    from fluxrt.export.torch_runner import recorded_loras, torch_runners

    folder = ExportFolder.open(variant_exports["ort-fp32-lora"])
    record = folder.record("transformer")
    assert record["attention"] == "ort"
    assert record["loras"] == [  # path, sha256, layout, scale
        {"path": str(loras["attn"].resolve()), "sha256": hashlib.sha256(loras["attn"].read_bytes()).hexdigest(),
         "layout": "peft", "scale": 0.8},
        {"path": str(loras["kohya"].resolve()), "sha256": hashlib.sha256(loras["kohya"].read_bytes()).hexdigest(),
         "layout": "kohya", "scale": 1.0}]
    files = [(read_lora(loras["attn"], config), 0.8), (read_lora(loras["kohya"], config), 1.0)]
    plain = graph_linears(fp32_exports["dev"] / "transformer.onnx")
    runtime = plain.merged(files)
    exported = graph_linears(folder.graph_path("transformer"))
    read = weight_reader(exported.path)
    modules = sorted({m for lora, _ in files for m in lora.deltas})
    for module in modules:
        slot = plain.slots[module]
        want = runtime[slot.initializer].astype(np.float32)
        assert np.array_equal(read(exported.slots[module]), want.T if slot.transposed else want), module
    untouched = next(m for m in plain.slots if m not in modules)
    assert np.array_equal(read(exported.slots[untouched]), weight_reader(plain.path)(plain.slots[untouched]))

    assert [(lora.sha256, scale) for lora, scale in recorded_loras(folder)] == [(f.sha256, s) for f, s in files]
    runner = torch_runners(folder, ("transformer",))["transformer"].activate()
    to_q = runner.module.get_submodule("model.transformer_blocks.0.attn.to_q").weight.float().numpy()
    assert np.array_equal(to_q, read(exported.slots["transformer_blocks.0.attn.to_q"]))
    stale = json.loads(json.dumps(folder.manifest))
    stale["components"]["transformer"]["loras"][1]["sha256"] = "0" * 64
    with pytest.raises(CheckpointError, match=r"kohya.safetensors changed since .* was exported with it merged"):
        recorded_loras(ExportFolder.from_manifest(folder.root, stale))
    stale["components"]["transformer"]["loras"][1]["scale"] = "1"
    with pytest.raises(ExportError, match=r"components.transformer.loras must be a list of \{path, sha256, layout"):
        ExportFolder.from_manifest(folder.root, stale)


def test_ort_kernels_graph_merges_from_external_data_and_its_split_projections(graphs, config, loras, tmp_path):
    """The ort-kernels bf16 graph's merged weights equal the portable graph's bit for bit, a split proj_out's two
    column blocks included (each the same float32 sums, cast once); its bias moves by ΔW_attn @ b_v from the stored
    one. A graph exported before the value bias was recorded refuses a LoRA on proj_out by name."""
    import onnx

    files = [(read_lora(loras["mlp-bf16"], config), 0.7), (read_lora(loras["ctx-fp16"], config), 1.3),
             (read_lora(loras["attn"], config), 1.0)]
    kernels, portable = graph_linears(graphs["ort-kernels-bf16"]), graph_linears(graphs["portable-bf16"])
    got, want = kernels.merged(files), portable.merged(files)
    for module in {m for lora, _ in files for m in lora.deltas}:
        slot = kernels.slots[module]
        b = want[portable.slots[module].initializer]  # [in, out] as stored
        if isinstance(slot, SplitSlot):
            width = slot.attn.dims[0]
            pairs = [(got[slot.attn.initializer], b[:width]), (got[slot.mlp.initializer], b[width:])]
            read = weight_reader(kernels.path)
            delta = sum(lora.deltas[module].matrix(scale) for lora, scale in files if module in lora.deltas)
            bias = read(slot.bias) + delta[:, :width] @ slot.value_bias
            np.testing.assert_array_equal(got[slot.bias.initializer].astype(np.float32),
                                          bias.astype(got[slot.bias.initializer].dtype).astype(np.float32))
        else:
            pairs = [(got[slot.initializer], b)]
        for a, w in pairs:
            assert a.dtype == w.dtype and np.array_equal(a.view(np.uint16), w.view(np.uint16)), module
    old = onnx.load(str(graphs["ort-kernels-bf16"]), load_external_data=False)
    for node in old.graph.node:
        kept = [p for p in node.metadata_props if p.key != "fluxrt.value_bias"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    stale = graphs["ort-kernels-bf16"].parent / "stale-transformer.onnx"  # beside its external data
    onnx.save_model(old, str(stale))
    try:
        with pytest.raises(InvalidInputError, match=r"attn.safetensors: it changes 'single_transformer_blocks.0.proj_out', "
                                                    r"which the transformer graph .* cannot take: .*to_v's bias folded.*"
                                                    r"graphs exported by this fluxrt record to_v's bias and take it"):
            graph_linears(stale).check([(read_lora(loras["attn"], config), 1.0)])
    finally:
        stale.unlink()


@pytest.mark.parametrize("case", [[("attn", 1.0)], [("kohya", 0.8)]], ids=["peft-proj_out", "kohya-linear2"])
def test_ort_kernels_images_with_loras_on_the_split_projection_equal_diffusers(theirs, kernels_dev, ops_library,
                                                                              loras, case, monkeypatch):
    """LoRAs on every single block's proj_out (peft's proj_out, kohya's linear2) on the fp32 ort-kernels export:
    diffusers' images with the same adapters within IMAGE_TOL; unloading gives the base images bit for bit."""
    from fluxrt.runtime import ort_ops

    monkeypatch.setenv(ort_ops.ENV_LIBRARY, str(ops_library))
    files = [(loras[key], scale) for key, scale in case]
    want = diffusers_images(theirs, files)
    pipe = FluxPipeline.load(kernels_dev, backend="ort-cpu")
    plain = images(pipe)
    for path, scale in files:
        pipe.load_lora(path, scale)
    got = images(pipe)
    pipe.unload_lora()
    assert np.abs(got - want).max() < IMAGE_TOL
    assert np.abs(got - plain).max() > 50 * IMAGE_TOL
    np.testing.assert_array_equal(images(pipe), plain)


# ---- errors ---------------------------------------------------------------------------------------------

def test_unknown_names_and_bad_scales_are_refused(ours, loras):
    name = ours.load_lora(loras["kohya"])
    try:
        with pytest.raises(InvalidInputError, match=rf"no LoRA named 'nope' is loaded; the loaded ones are \['{name}'\]"):
            ours.unload_lora("nope")
        for scale in (float("nan"), "1", True):
            with pytest.raises(InvalidInputError, match="LoRA scale must be a finite number, got"):
                ours.load_lora(loras["kohya"], scale)
        assert list(ours.loras) == [name]
    finally:
        ours.unload_lora()


def test_loras_that_do_not_fit_the_model_are_refused(ours, tmp_path):
    wrong = save(tmp_path / "wrong.safetensors", peft_pair("transformer_blocks.0.attn.to_q", (2, 32), (64, 2)))
    with pytest.raises(InvalidInputError, match=r"wrong.safetensors: its update of 'transformer_blocks.0.attn.to_q' "
                                                r"is \[out, in\] = \[64, 32\]; this transformer's linear is \[64, 64\]"):
        ours.load_lora(wrong)
    other = save(tmp_path / "other.safetensors", peft_pair("transformer_blocks.9.attn.to_q", (2, 64), (64, 2)))
    with pytest.raises(InvalidInputError, match="'transformer_blocks.9.attn.to_q', which this transformer does not"):
        ours.load_lora(other)
    assert ours.loras == {}


def test_backends_without_lora_refuse(fp32_exports, loras):
    """(LoRA under FP8: tests/test_fp8_kernels.py.)"""
    from fluxrt.export.torch_runner import torch_runners

    torch_transformer = torch_runners(ExportFolder.open(fp32_exports["dev"]), ("transformer",))
    pipe = FluxPipeline.load(fp32_exports["dev"], runners=torch_transformer)
    with pytest.raises(InvalidInputError, match=r"transformer \(torch\): the torch backend cannot take LoRA weights"):
        pipe.load_lora(loras["attn"])
    assert pipe.loras == {}


def test_cli_lora_flags(fp32_exports, tiny_checkpoints, loras, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "x.png"
    common = ["generate", "--onnx", str(fp32_exports["dev"]), "--prompt", "a paper boat", "--out", str(out),
              "--height", "32", "--width", "32", "--steps", "2"]
    for flag, message in [(f"{loras['attn']}:abc", "SCALE must be a finite number (FILE[:SCALE]), got 'abc'"),
                          (f"{loras['attn']}:inf", "SCALE must be a finite number"),
                          (f"{tmp_path / 'missing.safetensors'}:0.5", "missing.safetensors does not exist")]:
        assert main([*common, "--lora", flag]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fluxrt generate: error: --lora ") and message in err, err
    assert main(["export", str(tiny_checkpoints["dev"]), "--out", str(tmp_path / "e"), "--components", "clip",
                 "--lora", str(loras["attn"])]) == 2
    err = capsys.readouterr().err
    assert "--lora merge into the transformer, which --components ['clip'] leaves out" in err, err
    assert not (tmp_path / "e").exists()

    assert main([*common, "--lora", f"{loras['attn']}:0.5", "--lora", str(loras["kohya"])]) == 0
    image = Image.open(out)
    assert json.loads(image.text["fluxrt:loras"]) == [
        {"path": str(loras["attn"]), "sha256": hashlib.sha256(loras["attn"].read_bytes()).hexdigest(), "scale": 0.5},
        {"path": str(loras["kohya"]), "sha256": hashlib.sha256(loras["kohya"].read_bytes()).hexdigest(), "scale": 1.0}]
    pipe = FluxPipeline.load(fp32_exports["dev"], loras=[(loras["attn"], 0.5), (loras["kohya"], 1.0)])
    want = pipe("a paper boat", height=32, width=32, num_inference_steps=2, seed=0).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(want))


def test_runtime_loads_loras_without_torch_diffusers_or_peft(fp32_exports, loras):
    code = f"""
import sys
for name in ('torch', 'diffusers', 'peft', 'safetensors'):
    sys.modules[name] = None  # any import of them now fails
from fluxrt.runtime import FluxPipeline
pipe = FluxPipeline.load({str(fp32_exports['dev'])!r})
name = pipe.load_lora({str(loras['mlp-bf16'])!r}, 0.5)
pipe('a fox', height=32, width=32, num_inference_steps=1, seed=0)
pipe.unload_lora(name)
assert 'transformers' not in sys.modules
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.gpu
def test_cuda_graphs_are_captured_again_with_new_weights(fp32_exports, loras):
    """On ort-cuda with CUDA graphs, a graph captured before a load replays the old weights unless dropped."""
    from test_gpu_runtime import require_ort_cuda

    require_ort_cuda()
    pipe = FluxPipeline.load(fp32_exports["dev"], backend="ort-cuda", cuda_graph=True)
    base = images(pipe)
    pipe.load_lora(loras["attn"], 0.8)
    got = images(pipe)
    want = images(FluxPipeline.load(fp32_exports["dev"], backend="ort-cuda", cuda_graph=True,
                                    loras=[(loras["attn"], 0.8)]))
    assert np.array_equal(got, want) and np.abs(got - base).max() > 0.1
    pipe.unload_lora()
    assert np.array_equal(images(pipe), base)
