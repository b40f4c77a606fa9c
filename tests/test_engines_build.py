"""Engine building on CPU: profile shapes from the envelope, real plans built with TensorRT-RTX
(ahead of time, for SM89 / SM120) from small graphs that carry the components' real tensor
names, dtypes and dynamic axes, and the builder's error messages.

``component_graph`` provides ``(onnx_path, spec, dims)``; the stand-in modules below can be
swapped for the real tiny FLUX exports without touching the tests.
"""

from __future__ import annotations

import types

import onnx
import pytest
import torch

from fluxrt import trt as trt_picker
from fluxrt.components import ModelDims, ShapeEnvelope, component_spec
from fluxrt.engines.build import build_engine
from fluxrt.engines.profiles import profile_shapes
from fluxrt.errors import EngineError
from fluxrt.export.onnx_export import dynamic_shapes, example_inputs, opset_for
from fluxrt.export.weights import TORCH_DTYPES

DIMS = ModelDims("dev", clip_hidden_size=8, t5_d_model=8, t5_max_length=64, in_channels=16,
                 joint_attention_dim=8, pooled_projection_dim=8, latent_channels=4)
ENVELOPE = ShapeEnvelope(batch=(1, 2, 4), text_length=(1, 8, 16), image_side=(32, 64, 128))
TARGETS = ["SM89", "SM120"]


# ---------------------------------------------------------------- profiles (pure)

def test_envelope_defaults():
    env = ShapeEnvelope()
    assert (env.batch, env.text_length, env.image_side) == ((1, 1, 4), (1, 512, 512), (512, 1024, 1536))


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_side=(512, 1000, 1536)), r"\[1000\] not a multiple of 16"),
    (dict(batch=(2, 1, 4)), r"batch \(2, 1, 4\): need 0 < min <= opt <= max"),
    (dict(text_length=(0, 1, 1)), r"text_length .* need 0 < min"),
    (dict(batch=[1, 1, 4]), r"batch must be a \(min, opt, max\) tuple of ints, got \[1, 1, 4\]"),
    (dict(batch=(1, 1.5, 4)), r"tuple of ints"),
])
def test_envelope_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapeEnvelope(**kwargs)


def test_profile_shapes_full_size_dev():
    dims = ModelDims("dev")
    env = ShapeEnvelope()
    got = profile_shapes(component_spec("transformer", dims), env, dims)
    assert got == {
        "hidden_states": ((1, 1024, 64), (1, 4096, 64), (4, 9216, 64)),
        "encoder_hidden_states": ((1, 1, 4096), (1, 512, 4096), (4, 512, 4096)),
        "pooled_projections": ((1, 768), (1, 768), (4, 768)),
        "timestep": ((1,), (1,), (4,)),
        "img_ids": ((1024, 3), (4096, 3), (9216, 3)),
        "txt_ids": ((1, 3), (512, 3), (512, 3)),
        "guidance": ((1,), (1,), (4,)),
    }
    assert profile_shapes(component_spec("clip", dims), env, dims) == {
        "input_ids": ((1, 77), (1, 77), (4, 77))}
    assert profile_shapes(component_spec("t5", dims), env, dims) == {
        "input_ids": ((1, 1), (1, 512), (4, 512))}
    assert profile_shapes(component_spec("vae_decoder", dims), env, dims) == {
        "latent": ((1, 16, 64, 64), (1, 16, 128, 128), (4, 16, 192, 192))}
    assert profile_shapes(component_spec("vae_encoder", dims), env, dims) == {
        "images": ((1, 3, 512, 512), (1, 3, 1024, 1024), (4, 3, 1536, 1536))}


def test_profile_shapes_schnell_has_no_guidance_and_256_tokens():
    dims = ModelDims("schnell")
    got = profile_shapes(component_spec("transformer", dims), ShapeEnvelope(text_length=(1, 256, 256)), dims)
    assert "guidance" not in got
    assert got["txt_ids"] == ((1, 3), (256, 3), (256, 3))


@pytest.mark.parametrize("height, width", [(512, 1536), (1536, 512), (768, 1024), (512, 512), (1536, 1536)])
def test_non_square_images_fit_the_square_token_range(height, width):
    dims = ModelDims("dev")
    lo, _, hi = profile_shapes(component_spec("transformer", dims), ShapeEnvelope(), dims)["hidden_states"]
    assert lo[1] <= (height // 16) * (width // 16) <= hi[1]


def test_profile_shapes_rejects_text_beyond_t5_length():
    with pytest.raises(ValueError, match="text length max 512 exceeds the T5 max length 64"):
        profile_shapes(component_spec("t5", DIMS), ShapeEnvelope(), DIMS)


# ---------------------------------------------------------------- library picker

def fake_import(available: dict):
    def import_module(name):
        if name in available:
            return available[name]
        raise ModuleNotFoundError(f"No module named {name!r}")
    return import_module


def test_import_trt_names_what_it_tried_and_the_extras(monkeypatch):
    monkeypatch.setattr(trt_picker.importlib, "import_module", fake_import({}))
    with pytest.raises(EngineError) as e:
        trt_picker.import_trt()
    msg = str(e.value)
    assert "tensorrt (import tensorrt: No module named 'tensorrt')" in msg
    assert "tensorrt-rtx (import tensorrt_rtx_bindings: No module named 'tensorrt_rtx_bindings')" in msg
    assert "pip install 'fluxrt[trt]' or pip install 'fluxrt[trt-rtx]'" in msg


def test_import_trt_prefers_tensorrt_and_rejects_old_versions(monkeypatch):
    rtx = types.SimpleNamespace(__name__="tensorrt_rtx_bindings", __version__="1.7.1.116")
    new = types.SimpleNamespace(__name__="tensorrt", __version__="10.13.0")
    old = types.SimpleNamespace(__name__="tensorrt", __version__="8.6.1")
    monkeypatch.setattr(trt_picker.importlib, "import_module", fake_import({"tensorrt": new, "tensorrt_rtx_bindings": rtx}))
    assert trt_picker.import_trt() is new
    assert trt_picker.import_trt("tensorrt-rtx") is rtx
    monkeypatch.setattr(trt_picker.importlib, "import_module", fake_import({"tensorrt": old, "tensorrt_rtx_bindings": rtx}))
    assert trt_picker.import_trt() is rtx
    with pytest.raises(EngineError, match=r"tensorrt \(version 8.6.1, need >= 10\).*pip install 'fluxrt\[trt\]'$"):
        trt_picker.import_trt("tensorrt")
    with pytest.raises(ValueError, match=r"'trt' is not one of \['tensorrt', 'tensorrt-rtx'\]"):
        trt_picker.import_trt("trt")


# ---------------------------------------------------------------- stand-in graphs

class StandInTransformer(torch.nn.Module):
    """Uses every transformer input, in the spec's names, dtypes and axes."""

    def __init__(self, dims: ModelDims):
        super().__init__()
        c = dims.in_channels
        self.img = torch.nn.Linear(c, c)
        self.txt = torch.nn.Linear(dims.joint_attention_dim, c)
        self.pool = torch.nn.Linear(dims.pooled_projection_dim, c)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):
        act = hidden_states.dtype
        cond = self.pool(pooled_projections) + self.txt(encoder_hidden_states).mean(1)  # [B, C]
        pos = (img_ids.sum(-1, keepdim=True) + txt_ids.sum()).to(act)  # [N, 1]
        scale = timestep if guidance is None else timestep * guidance  # [B] float32
        return (self.img(hidden_states) + cond[:, None] + pos) * scale.to(act)[:, None, None]  # [B, N, C]


class StandInVaeEncoder(torch.nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        f = dims.vae_scale_factor
        self.conv = torch.nn.Conv2d(dims.image_channels, dims.latent_channels, f, stride=f)

    def forward(self, images):  # [B, 3, H, W] -> [B, latent, H/8, W/8]
        return self.conv(images)


class StandInT5(torch.nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        self.embed = torch.nn.Embedding(100, dims.t5_d_model)
        self.proj = torch.nn.Linear(dims.t5_d_model, dims.t5_d_model)

    def forward(self, input_ids):  # [B, S] int32 -> [B, S, D]
        return self.proj(self.embed(input_ids))


STAND_INS = {"transformer": StandInTransformer, "vae_encoder": StandInVaeEncoder, "t5": StandInT5}


def export_stand_in(component: str, precision: str, dims: ModelDims, path, external: bool = False):
    spec = component_spec(component, dims)
    torch.manual_seed(0)
    module = STAND_INS[component](dims).eval().to(TORCH_DTYPES[precision])
    with torch.no_grad():
        program = torch.onnx.export(
            module, example_inputs(spec, dims, precision), dynamo=True, opset_version=opset_for(precision),
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=dynamic_shapes(spec, dims), verbose=False,
        )
    program.save(str(path), external_data=external)
    return path


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Exports on first use: ``get(component, precision, external=False) -> onnx path``."""
    root = tmp_path_factory.mktemp("stand_ins")
    cache = {}

    def get(component: str, precision: str, external: bool = False):
        key = (component, precision, external)
        if key not in cache:
            folder = root / "_".join([component, precision] + ["external"] * external)
            folder.mkdir()
            cache[key] = export_stand_in(component, precision, DIMS, folder / f"{component}.onnx", external)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def trt():
    try:
        return trt_picker.import_trt()
    except EngineError as e:
        pytest.skip(str(e))


def targets_for(trt) -> list[str] | None:
    """TensorRT-RTX builds ahead of time for named GPUs; full TensorRT for the one it runs on."""
    return TARGETS if trt_picker.is_rtx(trt) else None


GRAPHS = [("transformer", "fp32"), ("transformer", "fp16"), ("transformer", "bf16"), ("vae_encoder", "fp32"),
          ("t5", "fp16")]


@pytest.fixture(params=GRAPHS, ids=["-".join(g) for g in GRAPHS])
def component_graph(request, stand_ins):
    component, precision = request.param
    return stand_ins(component, precision), component_spec(component, DIMS), DIMS


# ---------------------------------------------------------------- builds

def check_io(io: dict, spec, precision: str, envelope: ShapeEnvelope, dims: ModelDims) -> None:
    shapes = profile_shapes(spec, envelope, dims)
    assert [t["name"] for t in io["inputs"]] == spec.input_names
    assert [t["name"] for t in io["outputs"]] == spec.output_names
    for t in io["inputs"]:
        assert t["dtype"] == spec.input(t["name"]).resolved_dtype(precision), t
        assert tuple(tuple(s) for s in t["profile"]) == shapes[t["name"]], t
    for t, want in zip(io["outputs"], spec.outputs):
        assert t["dtype"] == want.resolved_dtype(precision), t


def graph_precision(onnx_path, spec) -> str:
    """fp32 / fp16 / bf16, from the ONNX dtype of the spec's first floating output."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    act = next(t.name for t in spec.outputs if t.dtype == "act")
    elem = next(o.type.tensor_type.elem_type for o in model.graph.output if o.name == act)
    return {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}[elem]


def test_build_plan_matches_spec_and_profile(trt, component_graph, tmp_path):
    onnx_path, spec, dims = component_graph
    precision = graph_precision(onnx_path, spec)
    plan = tmp_path / f"{spec.name}.plan"
    record = build_engine(onnx_path, spec, dims, ENVELOPE, plan, trt_module=trt,
                          compute_capabilities=targets_for(trt), progress=False)
    assert plan.is_file() and plan.stat().st_size == record["plan_bytes"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [plan.name]  # no temporary left behind
    assert record["precision"] == precision
    assert record["library"] == trt_picker.library_name(trt) and record["version"] == trt.__version__
    assert record["compute_capabilities"] == targets_for(trt)
    assert record["build_seconds"] > 0 and record["peak_rss_bytes"] > 0
    check_io(record["io"], spec, precision, ENVELOPE, dims)


def test_inspect_plan_reads_the_same_io_back(trt, stand_ins, tmp_path):
    from plan_inspection import inspect_plan

    spec = component_spec("transformer", DIMS)
    plan = tmp_path / "transformer.plan"
    record = build_engine(stand_ins("transformer", "fp16"), spec, DIMS, ENVELOPE, plan, trt_module=trt,
                          compute_capabilities=targets_for(trt), progress=False)
    try:
        io = inspect_plan(plan, trt)
    except EngineError as e:
        assert f"could not deserialize {plan}" in str(e)
        pytest.skip(f"plans cannot be deserialized on this machine: {e}")
    check_io(io, spec, "fp16", ENVELOPE, DIMS)
    assert io["inputs"] == record["io"]["inputs"] and io["num_profiles"] == 1


def test_build_reads_external_data_beside_the_graph(trt, stand_ins, tmp_path):
    onnx_path = stand_ins("transformer", "fp32", external=True)
    assert (onnx_path.parent / f"{onnx_path.name}.data").is_file()
    spec = component_spec("transformer", DIMS)
    record = build_engine(onnx_path, spec, DIMS, ENVELOPE, tmp_path / "t.plan", trt_module=trt,
                          compute_capabilities=targets_for(trt), progress=False)
    check_io(record["io"], spec, "fp32", ENVELOPE, DIMS)


def test_build_prints_progress(trt, stand_ins, tmp_path, capsys):
    build_engine(stand_ins("t5", "fp16"), component_spec("t5", DIMS), DIMS, ENVELOPE, tmp_path / "t5.plan",
                 trt_module=trt, compute_capabilities=targets_for(trt), progress=True)
    err = capsys.readouterr().err
    assert "[fluxrt build] t5: Building engine" in err
    assert f"[fluxrt build] t5: wrote {tmp_path / 't5.plan'}" in err


@pytest.mark.slow
@pytest.mark.parametrize("component", ["clip", "t5", "transformer", "vae_decoder", "vae_encoder"])
def test_build_real_tiny_export(trt, fp32_exports, component, tmp_path):
    from fluxrt.artifacts import ExportFolder

    folder = ExportFolder.open(fp32_exports["dev"])
    spec = folder.spec(component)
    record = build_engine(folder.graph_path(component), spec, folder.dims, ENVELOPE, tmp_path / f"{component}.plan",
                          trt_module=trt, compute_capabilities=targets_for(trt), progress=False)
    check_io(record["io"], spec, folder.graph_precision(component), ENVELOPE, folder.dims)


# ---------------------------------------------------------------- build errors

def build(trt, onnx_path, spec, out, **kwargs):
    return build_engine(onnx_path, spec, DIMS, ENVELOPE, out, trt_module=trt,
                        compute_capabilities=targets_for(trt), progress=False, **kwargs)


def test_wrong_component_graph_names_the_missing_input(trt, stand_ins, tmp_path):
    with pytest.raises(EngineError) as e:
        build(trt, stand_ins("vae_encoder", "fp32"), component_spec("transformer", DIMS), tmp_path / "x.plan")
    msg = str(e.value)
    assert "transformer: " in msg and "vae_encoder.onnx has inputs ['images']" in msg
    assert "missing ['hidden_states', 'encoder_hidden_states'," in msg
    assert "is it the transformer graph?" in msg
    assert not (tmp_path / "x.plan").exists()


def test_wrong_variant_names_the_unexpected_input(trt, stand_ins, tmp_path):
    schnell = ModelDims.from_json({**DIMS.to_json(), "variant": "schnell"})
    with pytest.raises(EngineError, match=r"missing \[\], unexpected \['guidance'\]"):
        build(trt, stand_ins("transformer", "fp32"), component_spec("transformer", schnell), tmp_path / "x.plan")


def test_graph_of_other_dims_is_refused(trt, stand_ins, tmp_path):
    wide = ModelDims.from_json({**DIMS.to_json(), "in_channels": 64, "latent_channels": 16})
    with pytest.raises(EngineError, match=r"tensor 'hidden_states' axis 2 is 16, expected 64"):
        build_engine(stand_ins("transformer", "fp32"), component_spec("transformer", wide), wide, ENVELOPE,
                     tmp_path / "x.plan", trt_module=trt, compute_capabilities=targets_for(trt), progress=False)


def test_static_axis_in_graph_is_refused(trt, stand_ins, tmp_path):
    model = onnx.load(str(stand_ins("t5", "fp16")))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # batch fixed at export
    static = tmp_path / "t5_static.onnx"
    onnx.save(model, str(static))
    with pytest.raises(EngineError, match=r"input 'input_ids' axis 0 is fixed to 2 in the graph, but the envelope "
                                          r"asks for 1..4; re-export with that axis dynamic"):
        build(trt, static, component_spec("t5", DIMS), tmp_path / "x.plan")


def test_corrupt_onnx_reports_the_parser_message_and_keeps_the_old_plan(trt, tmp_path):
    bad = tmp_path / "transformer.onnx"
    bad.write_bytes(b"\x08\x07not an onnx model\xff\xff")
    plan = tmp_path / "transformer.plan"
    plan.write_bytes(b"previous plan")
    with pytest.raises(EngineError, match=r"transformer: .*transformer.onnx: TensorRT's ONNX parser failed: "
                                          r"MODEL_DESERIALIZE_FAILED: .*Failed to parse the ONNX model"):
        build(trt, bad, component_spec("transformer", DIMS), plan)
    assert plan.read_bytes() == b"previous plan"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transformer.onnx", "transformer.plan"]


def test_missing_onnx_and_output_folder(trt, stand_ins, tmp_path):
    spec = component_spec("t5", DIMS)
    with pytest.raises(EngineError, match=r"t5: ONNX file .*nowhere.onnx does not exist"):
        build(trt, tmp_path / "nowhere.onnx", spec, tmp_path / "x.plan")
    with pytest.raises(EngineError, match=r"t5: output folder .*no_such_dir does not exist"):
        build(trt, stand_ins("t5", "fp16"), spec, tmp_path / "no_such_dir" / "x.plan")


def test_unknown_compute_capability(trt, stand_ins, tmp_path):
    if not trt_picker.is_rtx(trt):
        pytest.skip("compute capabilities are a TensorRT-RTX option")
    with pytest.raises(ValueError, match=r"compute capability 'SM90' is not one of \['SM75', .*'SM89', 'SM120'"):
        build_engine(stand_ins("t5", "fp16"), component_spec("t5", DIMS), DIMS, ENVELOPE, tmp_path / "x.plan",
                     trt_module=trt, compute_capabilities=["SM90"], progress=False)


def test_timing_cache_is_refused_on_rtx(trt, stand_ins, tmp_path):
    if not trt_picker.is_rtx(trt):
        pytest.skip("TensorRT-RTX has no timing cache")
    with pytest.raises(EngineError, match=r"TensorRT-RTX 1\.\d.* has no timing cache .*leave timing_cache out"):
        build(trt, stand_ins("t5", "fp16"), component_spec("t5", DIMS), tmp_path / "x.plan",
              timing_cache=tmp_path / "cache.bin")
