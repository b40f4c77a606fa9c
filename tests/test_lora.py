"""LoRA files (fluxrt.lora) against diffusers: for LoRAs made by peft (ranks, alphas, patterns, dtypes) and
kohya-layout files, the update fluxrt reads for every linear equals what diffusers' FluxPipeline fuses into that
linear (load_lora_weights, set_adapters, fuse_lora) on the tiny model, within 1e-6 of the weights' scale."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fluxrt import lora
from fluxrt.errors import InvalidInputError

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def pipe_and_base(tiny_checkpoints):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_checkpoints["dev"], dtype=torch.float32)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    return pipe, base


@pytest.fixture(scope="module")
def config(pipe_and_base):
    return dict(pipe_and_base[0].transformer.config)


def fused_updates(pipe, base, path, scale) -> dict[str, np.ndarray]:
    """diffusers' fused weight minus the base weight, per module it changed."""
    pipe.load_lora_weights(str(path), adapter_name="a")
    pipe.set_adapters(["a"], [scale])
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    fused = {k.replace(".base_layer.", "."): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    out = {k[: -len(".weight")]: (fused[k] - base[k]).numpy() for k in base if k.endswith(".weight")
           and not torch.equal(fused[k], base[k])}
    pipe.unfuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    pipe.transformer.load_state_dict(base)  # unfusing subtracts: start the next case from the exact base
    return out


def assert_same_updates(ours: lora.LoraFile, theirs: dict[str, np.ndarray], scale: float) -> None:
    assert sorted(ours.deltas) == sorted(theirs)
    for module, want in theirs.items():
        got = ours.deltas[module].matrix(scale)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-6 * max(np.abs(want).max(), 1.0), module


def peft_lora(pipe, path, targets, r, alpha, dtype, rank_pattern=None, alpha_pattern=None, rslora=False,
              metadata=True, seed=0):
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, rank_pattern=rank_pattern or {},
                     alpha_pattern=alpha_pattern or {}, use_rslora=rslora, init_lora_weights=False)
    pipe.transformer.add_adapter(cfg, adapter_name="make")
    state = {k: v.to(dtype) for k, v in get_peft_model_state_dict(pipe.transformer, adapter_name="make").items()}
    pipe.transformer.delete_adapters("make")
    FluxPipeline.save_lora_weights(path.parent, transformer_lora_layers=state, weight_name=path.name,
                                   transformer_lora_adapter_metadata=cfg.to_dict() if metadata else None)
    return path


@pytest.mark.parametrize("case", [
    dict(targets=["to_q", "to_k", "to_v", "to_out.0"], r=4, alpha=8, dtype=torch.float32, scale=1.0),
    dict(targets=["add_q_proj", "proj_mlp", "proj_out", "ff.net.2", "norm1.linear"], r=2, alpha=3,
         dtype=torch.bfloat16, scale=0.7, rank_pattern={"proj_mlp": 3}, alpha_pattern={"ff.net.2": 5}),
    dict(targets=["to_q", "ff_context.net.0.proj", "norm.linear", "x_embedder"], r=8, alpha=4, dtype=torch.float16,
         scale=1.3, rslora=True),
    dict(targets=["to_k", "to_add_out"], r=3, alpha=6, dtype=torch.float32, scale=0.5, metadata=False),
], ids=["fp32-attention", "bf16-patterns", "fp16-rslora", "no-metadata"])
def test_peft_loras_equal_diffusers_fused_weights(pipe_and_base, config, tmp_path, case):
    pipe, base = pipe_and_base
    case = dict(case)
    scale = case.pop("scale")
    path = peft_lora(pipe, tmp_path / "peft.safetensors", **case)
    ours = lora.read_lora(path, config)
    assert ours.layout == "peft" and len(ours.sha256) == 64
    if case.get("rank_pattern"):  # the pattern's rank and alpha reached the modules they match
        assert ours.deltas["single_transformer_blocks.0.proj_mlp"].down.shape[0] == 3
        assert ours.deltas["transformer_blocks.1.ff.net.2"].multiplier == pytest.approx(5 / 2)
    if not case.get("metadata", True):
        assert {d.multiplier for d in ours.deltas.values()} == {1.0}
    assert_same_updates(ours, fused_updates(pipe, base, path, scale), scale)


def kohya_file(path, config, alpha: float | None, dtype=torch.float32, seed=1, linear1=False):
    """A kohya sd-scripts FLUX LoRA over every part of both block kinds, random up and down matrices; a single
    block's linear1 only with ``linear1`` (diffusers' converter splits it at FLUX.1's own widths, 3072 and
    12288, so the tiny model cannot load it through diffusers)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    d = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = int(d * config.get("mlp_ratio", 4.0))
    shapes = {}
    for i in range(config["num_layers"]):
        for stream in ("img", "txt"):
            shapes.update({f"double_blocks_{i}_{stream}_attn_qkv": (3 * d, d), f"double_blocks_{i}_{stream}_attn_proj": (d, d),
                           f"double_blocks_{i}_{stream}_mlp_0": (mlp, d), f"double_blocks_{i}_{stream}_mlp_2": (d, mlp),
                           f"double_blocks_{i}_{stream}_mod_lin": (6 * d, d)})
    for i in range(config["num_single_layers"]):
        shapes.update({f"single_blocks_{i}_linear2": (d, d + mlp), f"single_blocks_{i}_modulation_lin": (3 * d, d)})
        if linear1:
            shapes[f"single_blocks_{i}_linear1"] = (3 * d + mlp, d)
    state = {}
    for name, (out, inp) in shapes.items():
        rank = 4
        state[f"lora_unet_{name}.lora_down.weight"] = (torch.randn(rank, inp, generator=g) * 0.1).to(dtype)
        state[f"lora_unet_{name}.lora_up.weight"] = (torch.randn(out, rank, generator=g) * 0.1).to(dtype)
        if alpha is not None:
            state[f"lora_unet_{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("alpha,dtype,scale", [(2.0, torch.float32, 1.0), (None, torch.bfloat16, 0.8)],
                         ids=["alpha-fp32", "no-alpha-bf16"])
def test_kohya_loras_equal_diffusers_fused_weights(pipe_and_base, config, tmp_path, alpha, dtype, scale):
    pipe, base = pipe_and_base
    path = kohya_file(tmp_path / "kohya.safetensors", config, alpha, dtype)
    ours = lora.read_lora(path, config)
    assert ours.layout == "kohya"
    assert {d.multiplier for d in ours.deltas.values()} == {alpha / 4 if alpha else 1.0}
    # qkv thirds and linear1's q/k/v/MLP parts share the one down matrix
    assert ours.deltas["transformer_blocks.0.attn.to_q"].down is ours.deltas["transformer_blocks.0.attn.to_v"].down
    assert_same_updates(ours, fused_updates(pipe, base, path, scale), scale)


def test_kohya_single_block_linear1_splits_as_diffusers_converter_does(tmp_path):
    """At FLUX.1's width (3072, MLP 12288): linear1's update is q, k, v and the MLP's input projection, each
    equal to what diffusers' kohya converter makes of it (the converter bakes alpha / rank into the matrices)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    config = dict(num_attention_heads=24, attention_head_dim=128, in_channels=64, joint_attention_dim=4096,
                  pooled_projection_dim=768, num_layers=1, num_single_layers=1, guidance_embeds=True)
    g = torch.Generator().manual_seed(3)
    state = {"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(2, 3072, generator=g),
             "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(3 * 3072 + 12288, 2, generator=g),
             "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(3.0)}
    ours = lora.read_lora(save(tmp_path / "linear1.safetensors", state), config)
    theirs = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in state.items()})
    modules = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    assert sorted(ours.deltas) == sorted(f"single_transformer_blocks.0.{m}" for m in modules)
    for m in modules:
        key = f"transformer.single_transformer_blocks.0.{m}"
        want = (theirs[f"{key}.lora_B.weight"] @ theirs[f"{key}.lora_A.weight"]).numpy()
        got = ours.deltas[f"single_transformer_blocks.0.{m}"].matrix()
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), m


def save(path, state, metadata=None):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def peft_pair(module: str, down: tuple, up: tuple, prefix: str = "transformer.") -> dict:
    """A diffusers/peft file's two matrices for ``module``, random, of the shapes given."""
    return {f"{prefix}{module}.lora_A.weight": torch.randn(*down), f"{prefix}{module}.lora_B.weight": torch.randn(*up)}


@pytest.mark.parametrize("state,message", [
    (peft_pair("transformer_blocks.7.attn.to_q", (2, 64), (64, 2)),
     r"it targets 'transformer_blocks.7.attn.to_q', which this transformer does not have"),
    (peft_pair("transformer_blocks.0.attn.to_q", (2, 32), (64, 2)),
     r"update of 'transformer_blocks.0.attn.to_q' is \[out, in\] = \[64, 32\]; this transformer's linear is \[64, 64\]"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 64)},
     r"module 'transformer_blocks.0.attn.to_q' has no lora_B.weight"),
    (peft_pair("transformer_blocks.0.attn.to_q", (2, 64), (64, 3)),
     r"down \[2, 64\] and up \[64, 3\] are not \[rank, in\] and \[out, rank\] matrices of one rank"),
    (peft_pair("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", (2, 32), (32, 2), prefix=""),
     r"2 tensors target a text encoder .*fluxrt applies LoRA to the transformer only"),
    ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 32)},
     r"target a text encoder \(first: 'lora_te1_text_model"),
    ({"lora_unet_final_layer_linear.lora_down.weight": torch.randn(2, 64),
      "lora_unet_final_layer_linear.lora_up.weight": torch.randn(64, 2)},
     r"lora_unet_final_layer_linear names no linear fluxrt knows"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 64),
      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(190, 2)},
     r"has 190 rows, not three equal parts of q, k and v"),
    ({**peft_pair("transformer_blocks.0.attn.to_q", (2, 64), (64, 2)),
      "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.randn(64)},
     r"is a DoRA or LoRA-bias term"),
    ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.randn(192, 64)},
     r"key 'model.diffusion_model.double_blocks.0.img_attn.qkv.weight' is neither diffusers/peft"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 64).to(torch.int8)},
     r"tensor 'transformer.transformer_blocks.0.attn.to_q.lora_A.weight' is stored as I8"),
])
def test_bad_loras_are_refused_naming_the_key(config, tmp_path, state, message):
    path = save(tmp_path / "bad.safetensors", state)
    with pytest.raises(InvalidInputError, match=message):
        lora.read_lora(path, config)


def test_metadata_that_disagrees_with_the_file_is_refused(config, tmp_path):
    state = peft_pair("transformer_blocks.0.attn.to_q", (2, 64), (64, 2))
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 4})}
    with pytest.raises(InvalidInputError, match=r"to_q.lora_A.weight has rank 2, its metadata says r = 4"):
        lora.read_lora(save(tmp_path / "m.safetensors", state, meta), config)
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.use_dora": True})}
    with pytest.raises(InvalidInputError, match="use_dora"):
        lora.read_lora(save(tmp_path / "d.safetensors", state, meta), config)


def test_files_that_are_not_safetensors_are_refused(config, tmp_path):
    good = save(tmp_path / "good.safetensors", peft_pair("proj_out", (2, 64), (64, 2)))
    raw = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-10])
    with pytest.raises(InvalidInputError, match=r"does not hold F32 \[64, 2\].*truncated"):
        lora.read_lora(tmp_path / "cut.safetensors", config)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(InvalidInputError, match="not a safetensors file"):
        lora.read_lora(tmp_path / "junk.safetensors", config)
    with pytest.raises(InvalidInputError, match="cannot be read"):
        lora.read_lora(tmp_path / "missing.safetensors", config)


def test_bfloat16_values_are_read_exactly(config, tmp_path):
    a = torch.randn(2, 64).to(torch.bfloat16)
    b = torch.randn(64, 2).to(torch.bfloat16)
    path = save(tmp_path / "bf16.safetensors", {"transformer.proj_out.lora_A.weight": a,
                                                "transformer.proj_out.lora_B.weight": b})
    delta = lora.read_lora(path, config).deltas["proj_out"]
    assert np.array_equal(delta.down, a.float().numpy()) and np.array_equal(delta.up, b.float().numpy())


def test_linears_match_diffusers_module_tree(pipe_and_base, config):
    """transformer_linears lists every nn.Linear of diffusers' FluxTransformer2DModel with its shape."""
    model = pipe_and_base[0].transformer
    want = {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert lora.transformer_linears(config) == want
