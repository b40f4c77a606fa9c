"""BFL single-file layout <-> diffusers: exact round trips, BFL's own key set, diffusers' own
converters as the independent reference, and the error messages."""

from __future__ import annotations

import pytest
import torch

from bfl_writers import transformer_diffusers_to_bfl, vae_diffusers_to_bfl
from fluxrt.errors import CheckpointError
from fluxrt.export import bfl

TRANSFORMER = dict(num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2, in_channels=64,
                   joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 14, 14))
WIDTH = 64
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
           norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           use_quant_conv=False, use_post_quant_conv=False)
# 32 groups, two resnets per level, quant convs present: the other branches of the layout
VAE_32 = dict(VAE, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32,
              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
              use_quant_conv=True, use_post_quant_conv=True)


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Default inits leave norms at 1 and biases at 0, which would hide a swapped tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def tiny_transformer(guidance: bool) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return perturbed(FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=guidance), seed=int(guidance))


def tiny_vae(kwargs: dict) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return perturbed(AutoencoderKL(**kwargs), seed=2)


def assert_identical(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def on_meta(sd: dict) -> dict:
    return {k: torch.empty(v.shape, device="meta") for k, v in sd.items()}


# ---- 1. round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [True, False])
def test_transformer_round_trip(guidance):
    sd = tiny_transformer(guidance).state_dict()
    expected = dict(TRANSFORMER, axes_dims_rope=[4, 14, 14], guidance_embeds=guidance, patch_size=1, out_channels=64)
    single = transformer_diffusers_to_bfl(sd)
    back, config = bfl.transformer_bfl_to_diffusers(single)
    assert config == expected
    assert_identical(back, sd)
    prefixed = {bfl.BFL_PREFIX + k: v for k, v in single.items()}
    assert_identical(bfl.transformer_bfl_to_diffusers(prefixed)[0], sd)
    assert bfl.transformer_bfl_to_diffusers(on_meta(single))[1] == expected  # config from a header alone


@pytest.mark.parametrize("kwargs", [VAE, VAE_32], ids=["groups4", "groups32"])
def test_vae_round_trip(kwargs):
    sd = tiny_vae(kwargs).state_dict()
    single = vae_diffusers_to_bfl(sd)
    back, config = bfl.vae_bfl_to_diffusers(single, norm_num_groups=kwargs["norm_num_groups"])
    listed = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    assert config == dict(listed, scaling_factor=0.3611, shift_factor=0.1159)
    assert_identical(back, sd)


def test_vae_groups_default_to_bfl_32():
    single = vae_diffusers_to_bfl(tiny_vae(VAE_32).state_dict())
    assert bfl.vae_bfl_to_diffusers(on_meta(single))[1]["norm_num_groups"] == 32


def test_vae_scaling_is_the_callers():
    single = vae_diffusers_to_bfl(tiny_vae(VAE).state_dict())
    config = bfl.vae_bfl_to_diffusers(single, norm_num_groups=4, scaling_factor=0.13, shift_factor=None)[1]
    assert (config["scaling_factor"], config["shift_factor"]) == (0.13, None)


def test_rope_axes_rule():
    assert bfl.rope_axes(128) == (16, 56, 56)
    assert bfl.rope_axes(32) == (4, 14, 14)
    with pytest.raises(ValueError, match=r"head size 48: .*gives \(6, 21, 21\)"):
        bfl.rope_axes(48)


# ---- 2. independent references --------------------------------------------------------------------
def bfl_flux_keys(depth: int, depth_single: int, guidance: bool) -> set[str]:
    """The parameter names of black-forest-labs/flux's ``Flux`` (src/flux/model.py, modules/layers.py):
    norms without parameters (img_norm1/2, pre_norm, norm_final) have no keys."""
    def linear(name: str) -> set[str]:
        return {f"{name}.weight", f"{name}.bias"}

    keys = linear("img_in") | linear("txt_in") | linear("final_layer.linear") | linear("final_layer.adaLN_modulation.1")
    for embedder in ["time_in", "vector_in"] + (["guidance_in"] if guidance else []):
        keys |= linear(f"{embedder}.in_layer") | linear(f"{embedder}.out_layer")
    for i in range(depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            keys |= linear(f"{p}_mod.lin") | linear(f"{p}_attn.qkv") | linear(f"{p}_attn.proj")
            keys |= linear(f"{p}_mlp.0") | linear(f"{p}_mlp.2")
            keys |= {f"{p}_attn.norm.query_norm.scale", f"{p}_attn.norm.key_norm.scale"}
    for i in range(depth_single):
        p = f"single_blocks.{i}"
        keys |= linear(f"{p}.linear1") | linear(f"{p}.linear2") | linear(f"{p}.modulation.lin")
        keys |= {f"{p}.norm.query_norm.scale", f"{p}.norm.key_norm.scale"}
    return keys


@pytest.mark.parametrize("guidance", [True, False])
def test_transformer_has_bfls_key_set_and_shapes(guidance):
    single = transformer_diffusers_to_bfl(tiny_transformer(guidance).state_dict())
    assert set(single) == bfl_flux_keys(2, 2, guidance)
    w, mlp = WIDTH, 4 * WIDTH
    shapes = {"double_blocks.1.img_attn.qkv.weight": (3 * w, w), "double_blocks.0.txt_mod.lin.weight": (6 * w, w),
              "single_blocks.0.linear1.weight": (3 * w + mlp, w), "single_blocks.1.linear2.weight": (w, w + mlp),
              "single_blocks.0.modulation.lin.weight": (3 * w, w), "final_layer.adaLN_modulation.1.weight": (2 * w, w),
              "time_in.in_layer.weight": (w, 256), "single_blocks.1.norm.key_norm.scale": (32,)}
    assert {k: tuple(single[k].shape) for k in shapes} == shapes


FLUX_WIDTH = 3072  # diffusers' converter hardcodes FLUX.1's width when it splits single_blocks.*.linear1


def padded_linear1(single: dict) -> dict:
    """Pad each part of linear1 (q, k, v, mlp: BFL's SingleStreamBlock order) to FLUX.1's sizes."""
    out = dict(single)
    for key in [k for k in single if ".linear1." in k]:
        parts = torch.split(single[key], [WIDTH] * 3 + [4 * WIDTH])
        sizes = [FLUX_WIDTH] * 3 + [4 * FLUX_WIDTH]
        padded = [torch.cat([p, p.new_zeros((n - p.shape[0],) + p.shape[1:])]) for p, n in zip(parts, sizes)]
        out[key] = torch.cat(padded)
    return out


@pytest.mark.parametrize("guidance", [True, False])
def test_diffusers_converter_reads_our_transformer_back(guidance):
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    sd = tiny_transformer(guidance).state_dict()
    single = {bfl.BFL_PREFIX + k: v for k, v in transformer_diffusers_to_bfl(sd).items()}
    ref = convert_flux_transformer_checkpoint_to_diffusers(padded_linear1(single))
    split = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".proj_mlp.")
    ref = {k: v[:sd[k].shape[0]] if k.startswith("single_") and any(s in k for s in split) else v
           for k, v in ref.items()}
    assert_identical(ref, sd)


@pytest.mark.parametrize("kwargs", [VAE, VAE_32], ids=["groups4", "groups32"])
def test_diffusers_converter_reads_our_vae_back(kwargs):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = tiny_vae(kwargs).state_dict()
    assert_identical(convert_ldm_vae_checkpoint(vae_diffusers_to_bfl(sd), kwargs), sd)


# ---- 3. the converted weights compute the same thing ---------------------------------------------
@pytest.mark.parametrize("guidance", [True, False])
def test_transformer_forward_after_round_trip(guidance):
    from diffusers import FluxTransformer2DModel

    model = tiny_transformer(guidance)
    state, config = bfl.transformer_bfl_to_diffusers(transformer_diffusers_to_bfl(model.state_dict()))
    fresh = FluxTransformer2DModel(**config)
    fresh.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(3)
    n, s = 12, 5
    inputs = dict(hidden_states=torch.randn(1, n, 64, generator=g),  # img: [B, N, 64]
                  encoder_hidden_states=torch.randn(1, s, 32, generator=g),  # txt: [B, S, 32]
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.7]),
                  img_ids=torch.randn(n, 3, generator=g), txt_ids=torch.zeros(s, 3),
                  guidance=torch.tensor([3.5]) if guidance else None)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(**inputs).sample, model(**inputs).sample, rtol=0, atol=0)


def test_vae_forward_after_round_trip():
    from diffusers import AutoencoderKL

    model = tiny_vae(VAE)
    state, config = bfl.vae_bfl_to_diffusers(vae_diffusers_to_bfl(model.state_dict()), norm_num_groups=4)
    fresh = AutoencoderKL(**config)
    fresh.load_state_dict(state, strict=True)
    image = torch.randn(1, 3, 32, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(image, sample_posterior=False).sample,
                                   model(image, sample_posterior=False).sample, rtol=0, atol=0)


# ---- 4. errors -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dev_single() -> dict:
    return transformer_diffusers_to_bfl(tiny_transformer(True).state_dict())


@pytest.fixture(scope="module")
def ae_single() -> dict:
    return vae_diffusers_to_bfl(tiny_vae(VAE).state_dict())


def test_missing_transformer_key_is_named(dev_single):
    broken = {k: v for k, v in dev_single.items() if k != "double_blocks.1.txt_mlp.2.bias"}
    with pytest.raises(CheckpointError, match=r"BFL transformer \(expected 2 double blocks, 2 single blocks, width 64, "
                                              r"with a guidance embedder\): wrong key set: 1 missing \(e.g. "
                                              r"\['double_blocks.1.txt_mlp.2.bias'\]\)"):
        bfl.transformer_bfl_to_diffusers(broken)


def test_unknown_transformer_keys_are_named(dev_single):
    extra = dict(dev_single, **{"double_blocks.0.img_attn.bogus.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"1 unexpected \(e.g. \['double_blocks.0.img_attn.bogus.weight'\]\)"):
        bfl.transformer_bfl_to_diffusers(extra)
    stray = dict(dev_single, **{"single_blocks.7.linear2.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"missing \(e.g. \['single_blocks.2.linear1.bias'.*"
                                              r"1 unexpected \(e.g. \['single_blocks.7.linear2.weight'\]\)"):
        bfl.transformer_bfl_to_diffusers(stray)


def test_key_needed_for_sizes_is_named(dev_single):
    broken = {k: v for k, v in dev_single.items() if k != "img_in.weight"}
    with pytest.raises(CheckpointError, match="tensor 'img_in.weight' is missing; the model's sizes are read from it"):
        bfl.transformer_bfl_to_diffusers(broken)


def test_wrong_split_size_is_named(dev_single):
    broken = dict(dev_single, **{"single_blocks.1.linear1.weight": torch.zeros(7 * WIDTH + 1, WIDTH)})
    with pytest.raises(CheckpointError, match=r"tensor 'single_blocks.1.linear1.weight' has 449 rows, expected 448"):
        bfl.transformer_bfl_to_diffusers(broken)


def test_diffusers_side_mismatch_is_named(dev_single):
    sd = tiny_transformer(False).state_dict()
    del sd["proj_out.bias"]
    sd["norm_out.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"diffusers FluxTransformer2DModel .*1 missing "
                                              r"\(e.g. \['proj_out.bias'\]\); "
                                              r"1 unexpected \(e.g. \['norm_out.extra.weight'\]\)"):
        transformer_diffusers_to_bfl(sd)


def test_vae_mismatches_are_named(ae_single):
    broken = {k: v for k, v in ae_single.items() if k != "decoder.up.2.upsample.conv.bias"}
    broken["decoder.mid.attn_2.q.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"BFL autoencoder \(expected channels \[8, 8, 16, 16\], "
                                              r"1 resnets per level, no quant_conv/post_quant_conv\): "
                                              r"wrong key set: 1 missing \(e.g. "
                                              r"\['decoder.up.2.upsample.conv.bias'\]\); 1 unexpected \(e.g. "
                                              r"\['decoder.mid.attn_2.q.weight'\]\)"):
        bfl.vae_bfl_to_diffusers(broken, norm_num_groups=4)
    flat = dict(ae_single, **{"decoder.mid.attn_1.k.weight": torch.zeros(16, 16)})
    with pytest.raises(CheckpointError, match=r"'decoder.mid.attn_1.k.weight' has shape \(16, 16\), "
                                              r"expected a 1x1 conv"):
        bfl.vae_bfl_to_diffusers(flat, norm_num_groups=4)


def test_vae_groups_that_cannot_be_known(ae_single):
    with pytest.raises(CheckpointError, match=r"norm_num_groups is not stored .* 32 does not divide the channel counts "
                                              r"\[8, 8, 16, 16\], so BFL's code cannot build this autoencoder: converting it "
                                              r"needs norm_num_groups \(a divisor of 8\)"):
        bfl.vae_bfl_to_diffusers(ae_single)
    with pytest.raises(CheckpointError, match=r"norm_num_groups=16 does not divide .* \[8, 8, 16, 16\]"):
        bfl.vae_bfl_to_diffusers(ae_single, norm_num_groups=16)


def test_kind_detection(dev_single, ae_single):
    assert bfl.detect_bfl_kind(dev_single) == "transformer"
    assert bfl.detect_bfl_kind([bfl.BFL_PREFIX + k for k in dev_single]) == "transformer"
    assert bfl.detect_bfl_kind(ae_single) == "vae"
    with pytest.raises(CheckpointError, match="holds a BFL vae checkpoint, expected the transformer"):
        bfl.transformer_bfl_to_diffusers(ae_single)
    with pytest.raises(CheckpointError, match="holds a BFL transformer checkpoint, expected the vae"):
        bfl.vae_bfl_to_diffusers(dev_single)
    diffusers_keys = tiny_transformer(False).state_dict()
    with pytest.raises(CheckpointError,
                       match=r"not a Black Forest Labs .*found \d+ keys such as \['context_embedder.bias'"):
        bfl.detect_bfl_kind(diffusers_keys)
    with pytest.raises(CheckpointError, match="found keys of both"):
        bfl.detect_bfl_kind(list(dev_single) + list(ae_single))


def test_wrong_prefix_is_named(dev_single):
    foreign = {"diffusion_model." + k: v for k, v in dev_single.items()}
    with pytest.raises(CheckpointError, match=r"found \d+ keys such as \['diffusion_model.double_blocks.0"):
        bfl.transformer_bfl_to_diffusers(foreign)
    mixed = {(bfl.BFL_PREFIX + k if k != "txt_in.bias" else k): v for k, v in dev_single.items()}
    with pytest.raises(CheckpointError, match=r"1 do not \(e.g. \['txt_in.bias'\]\); expected all or none"):
        bfl.transformer_bfl_to_diffusers(mixed)
