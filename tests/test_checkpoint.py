"""The tiny checkpoint is a real diffusers FLUX folder; our loader reads it, BFL single files
of it, and reports broken files by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bfl_writers import transformer_diffusers_to_bfl, vae_diffusers_to_bfl
from fluxrt.errors import CheckpointError
from fluxrt.export.checkpoint import Checkpoint


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_diffusers_loads_and_generates(variant, tiny_checkpoints):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_checkpoints[variant], local_files_only=True)
    assert pipe.transformer.config.guidance_embeds == (variant == "dev")
    image = pipe("a red fox in the snow", height=64, width=48, num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 48, 3) and np.isfinite(image).all()
    assert image.std() > 1e-3  # random weights still give a non-constant image


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_variant_comes_from_weights(variant, tiny_checkpoints):
    assert Checkpoint.open(tiny_checkpoints[variant]).dims().variant == variant


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_loader_equals_diffusers(variant, tiny_checkpoints):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    root = tiny_checkpoints[variant]
    ckpt = Checkpoint.open(root)
    pairs = [
        (ckpt.load_transformer(torch.float32), FluxTransformer2DModel.from_pretrained(root, subfolder="transformer")),
        (ckpt.load_vae(torch.float32), AutoencoderKL.from_pretrained(root, subfolder="vae")),
        (ckpt.load_clip(torch.float32), CLIPTextModel.from_pretrained(root, subfolder="text_encoder")),
        (ckpt.load_t5(torch.float32), T5EncoderModel.from_pretrained(root, subfolder="text_encoder_2")),
    ]
    for ours, theirs in pairs:
        a, b = ours.state_dict(), theirs.state_dict()
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def write_bfl_files(root, out_dir):
    ckpt = Checkpoint.open(root)
    tr = transformer_diffusers_to_bfl(ckpt.load_transformer(torch.float32).state_dict())
    ae = vae_diffusers_to_bfl(ckpt.load_vae(torch.float32).state_dict())
    save_file({k: v.contiguous() for k, v in tr.items()}, out_dir / "flux1-tiny.safetensors")
    save_file({k: v.contiguous() for k, v in ae.items()}, out_dir / "ae.safetensors")
    return out_dir / "flux1-tiny.safetensors", out_dir / "ae.safetensors"


@pytest.mark.parametrize("variant", ["dev", "schnell", "trained"])
def test_bfl_single_files_load_back_to_same_weights(variant, tiny_checkpoints, tmp_path):
    """The transformer from a BFL file equals the folder's; the autoencoder too where BFL's architecture can express
    it (the trained tiny model's: 32-group norms), read as BFL's code builds it (32 groups, FLUX.1's latent scale and
    shift) whatever the folder says. The random tiny VAEs (8 and 16 channels) are no BFL autoencoder: refused."""
    root = tiny_checkpoints[variant]
    tr_file, ae_file = write_bfl_files(root, tmp_path)
    plain = Checkpoint.open(root)
    if variant != "trained":
        with pytest.raises(CheckpointError, match=rf"autoencoder {ae_file}: BFL autoencoder: .*BFL's value 32 does not "
                                                  rf"divide the channel counts \[8, 8, 16, 16\], so BFL's code cannot "
                                                  rf"build this autoencoder"):
            Checkpoint.open(root, transformer_file=tr_file, vae_file=ae_file)
        ae_file = None
    single = Checkpoint.open(root, transformer_file=tr_file, vae_file=ae_file)
    assert single.dims() == plain.dims()  # variant told from the file's guidance weights
    assert single.transformer_config()["axes_dims_rope"] == plain.config("transformer")["axes_dims_rope"]
    for load in ("load_transformer", "load_vae"):
        a = getattr(plain, load)(torch.float32).state_dict()
        b = getattr(single, load)(torch.float32).state_dict()
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    if ae_file:
        folder, bfl_cfg = plain.vae_config(), single.vae_config()
        assert (folder["scaling_factor"], folder["shift_factor"]) != (0.3611, 0.1159)  # the trained model's own
        assert (bfl_cfg["scaling_factor"], bfl_cfg["shift_factor"], bfl_cfg["norm_num_groups"]) == (0.3611, 0.1159, 32)


def test_bfl_transformer_variant_and_rotary_axes_must_agree_with_the_folder(tiny_checkpoints, tmp_path):
    """A dev file beside a schnell folder (scheduler or transformer config) is refused, naming both; rotary axes come
    from the folder's config when it has one, and must sum to the weights' head size."""
    tr_file = write_bfl_files(tiny_checkpoints["dev"], tmp_path)[0]
    schnell = shutil.copytree(tiny_checkpoints["schnell"], tmp_path / "schnell")
    with pytest.raises(CheckpointError, match=rf"{tr_file} holds FLUX.1-dev weights \(guidance_in present\), but "
                                              rf"{schnell / 'scheduler'}/scheduler_config.json is a FLUX.1-schnell "
                                              rf"scheduler \(use_dynamic_shifting False\): give the folder of the dev"):
        Checkpoint.open(schnell, transformer_file=tr_file)
    shutil.copy(tiny_checkpoints["dev"] / "scheduler" / "scheduler_config.json", schnell / "scheduler")
    with pytest.raises(CheckpointError, match=rf"holds FLUX.1-dev weights .* but {schnell / 'transformer'}/config.json "
                                              rf"says guidance_embeds False"):
        Checkpoint.open(schnell, transformer_file=tr_file)
    shutil.rmtree(schnell / "transformer")  # no transformer config: FLUX.1's rotary rule for the head size
    assert Checkpoint.open(schnell, transformer_file=tr_file).transformer_config()["axes_dims_rope"] == [4, 14, 14]
    dev = shutil.copytree(tiny_checkpoints["dev"], tmp_path / "dev")
    config = json.loads((dev / "transformer" / "config.json").read_text())
    head = config["attention_head_dim"]
    assert head == 32
    for axes, message in (([4, 12, 16], None),
                          ([head // 4, head // 4, head // 4], rf"axes_dims_rope \[{head // 4}, {head // 4}, "
                                                              rf"{head // 4}\] sums to {3 * (head // 4)}, but the "
                                                              rf"weights' attention head size is {head}")):
        (dev / "transformer" / "config.json").write_text(json.dumps(dict(config, axes_dims_rope=axes)))
        if message is None:
            assert Checkpoint.open(dev, transformer_file=tr_file).transformer_config()["axes_dims_rope"] == axes
        else:
            with pytest.raises(CheckpointError, match=rf"transformer {tr_file}: {message}"):
                Checkpoint.open(dev, transformer_file=tr_file)


def test_missing_shard_is_named(tiny_checkpoints, tmp_path):
    root = shutil.copytree(tiny_checkpoints["dev"], tmp_path / "ckpt")
    index = json.loads((root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (root / "transformer" / shard).unlink()
    with pytest.raises(CheckpointError, match=f"missing: \\['{shard}'\\]"):
        Checkpoint.open(root).load_transformer(torch.float32)


def test_wrong_key_set_is_reported(tiny_checkpoints, tmp_path):
    root = shutil.copytree(tiny_checkpoints["dev"], tmp_path / "ckpt")
    path = root / "vae" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    state = load_file(path)
    state["decoder.bogus.weight"] = torch.zeros(1)
    del state["decoder.conv_out.weight"]
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"wrong key set: 1 missing \(e.g. \['decoder.conv_out.weight'\]\); "
                                              r"1 unexpected \(e.g. \['decoder.bogus.weight'\]\)"):
        Checkpoint.open(root).load_vae(torch.float32)


def test_unreadable_files_are_named(tiny_checkpoints, tmp_path):
    root = shutil.copytree(tiny_checkpoints["dev"], tmp_path / "ckpt")
    weights = root / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match=f"{weights}.*(truncated|not a safetensors)"):
        Checkpoint.open(root).load_clip(torch.float32)
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match=f"{weights} is not a safetensors file"):
        Checkpoint.open(root).load_clip(torch.float32)
    (root / "transformer" / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="transformer config .*config.json is not readable JSON"):
        Checkpoint.open(root)


def test_missing_folder_and_index(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="model_index.json is missing"):
        Checkpoint.open(tmp_path / "empty")


def test_bfl_file_of_wrong_kind(tiny_checkpoints, tmp_path):
    tr_file, ae_file = write_bfl_files(tiny_checkpoints["dev"], tmp_path)
    with pytest.raises(CheckpointError, match="holds a BFL vae checkpoint, expected the transformer"):
        Checkpoint.open(tiny_checkpoints["dev"], transformer_file=ae_file)


def test_cli_tiny_model(tmp_path, capsys):
    """The command's entry point writes the folder (called here; in a process of its own in
    test_hard_inputs.py); a second run into it is refused by the process, with exit status 2."""
    from fluxrt.cli import main

    assert main(["tiny-model", str(tmp_path / "m"), "--variant", "schnell", "--seed", "3"]) == 0, capsys.readouterr().err
    assert Checkpoint.open(tmp_path / "m").dims().variant == "schnell"
    r = subprocess.run([sys.executable, "-m", "fluxrt.cli", "tiny-model", str(tmp_path / "m")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr


# ---- ComfyUI-style full checkpoints and float8 files --------------------------------------------------------------
def write_bundle(root, path, drop=(), extra=None):
    """A ComfyUI-style full checkpoint of ``root``'s weights: BFL's transformer under model.diffusion_model., BFL's
    autoencoder under vae., the transformers text encoders under text_encoders.{clip_l,t5xxl}.transformer."""
    ckpt = Checkpoint.open(root)
    parts = {"model.diffusion_model.": transformer_diffusers_to_bfl(ckpt.load_transformer(torch.float32).state_dict()),
             "vae.": vae_diffusers_to_bfl(ckpt.load_vae(torch.float32).state_dict()),
             "text_encoders.clip_l.transformer.": ckpt.load_clip(torch.float32).state_dict(),
             "text_encoders.t5xxl.transformer.": ckpt.load_t5(torch.float32).state_dict()}
    state = {prefix + k: v.clone().contiguous() for prefix, sd in parts.items() for k, v in sd.items()}
    state = {k: v for k, v in state.items() if k not in drop and not k.endswith("position_ids")}
    save_file(dict(state, **(extra or {})), path)
    return path


def test_full_checkpoint_gives_every_component_of_its_own(tiny_checkpoints, tmp_path):
    """The trained tiny model (a BFL-expressible autoencoder) as one ComfyUI-style file beside its folder: all four
    modules equal the folder's weights, the autoencoder read as BFL's (32 groups, FLUX.1's latent scale)."""
    root = tiny_checkpoints["trained"]
    bundle = write_bundle(root, tmp_path / "flux1-tiny-full.safetensors")
    plain, single = Checkpoint.open(root), Checkpoint.open(root, transformer_file=bundle)
    assert dict(single.bundle) == {"transformer": "model.diffusion_model.", "vae": "vae.",
                                   "clip": "text_encoders.clip_l.transformer.", "t5": "text_encoders.t5xxl.transformer."}
    single.check_weights(("clip", "t5", "transformer", "vae"))
    assert single.dims() == plain.dims() and single.vae_config()["scaling_factor"] == 0.3611
    for load in ("load_transformer", "load_vae", "load_clip", "load_t5"):
        a = getattr(plain, load)(torch.float32).state_dict()
        b = getattr(single, load)(torch.float32).state_dict()
        assert set(a) == set(b), load
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_incomplete_or_foreign_full_checkpoints_are_refused_by_key(tiny_checkpoints, tmp_path):
    root = tiny_checkpoints["trained"]
    lacking = write_bundle(root, tmp_path / "lacking.safetensors",
                           drop={"text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight"})
    with pytest.raises(CheckpointError, match=r"wrong key set: 1 missing \(e.g. \['encoder.final_layer_norm.weight'\]\)"):
        Checkpoint.open(root, transformer_file=lacking).load_t5(torch.float32)
    stray = write_bundle(root, tmp_path / "stray.safetensors", extra={"cond_stage_model.x.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"a full checkpoint \(components under .*\), but 1 keys belong to none "
                                              r"of them \(e.g. \['cond_stage_model.x.weight'\]\)"):
        Checkpoint.open(root, transformer_file=stray)
    state = {k: v for k, v in load_file(write_bundle(root, tmp_path / "b.safetensors")).items()
             if not k.startswith("model.diffusion_model.")}
    save_file(state, tmp_path / "no-transformer.safetensors")
    with pytest.raises(CheckpointError, match=r"bundles \['clip', 't5', 'vae'\] .* but no transformer: expected its "
                                              r"keys under 'model.diffusion_model.'"):
        Checkpoint.open(root, transformer_file=tmp_path / "no-transformer.safetensors")


def fp8_file(sd: dict, path, scales: str | None):
    """``sd`` with its matrices in float8 E4M3: cast as they are (``scales`` None), or divided by a per-tensor scale
    stored as '<layer>.scale_weight' with ComfyUI's 'scaled_fp8' marker ("comfy"), or by per-row scales stored as
    '<layer>.weight_scale' ("rows"). Returns the weights the file means (float8 value times scale)."""
    out, meant = {}, {}
    for k, v in sd.items():
        if v.dim() != 2 or not k.endswith(".weight"):
            out[k] = meant[k] = v.contiguous()
            continue
        base = k.removesuffix(".weight")
        if scales is None:
            s = torch.ones(())
        elif scales == "comfy":
            s = (v.abs().max() / 448).clamp(min=1e-12)
            out[f"{base}.scale_weight"] = s.reshape(1)
        else:
            s = (v.abs().amax(dim=1) / 448).clamp(min=1e-12)
            out[f"{base}.weight_scale"] = s
        s = s.reshape(-1, 1) if s.dim() else s
        out[k] = (v / s).to(torch.float8_e4m3fn)
        meant[k] = out[k].float() * s
    if scales == "comfy":
        out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(out, path)
    return meant


@pytest.mark.parametrize("scales", [None, "comfy", "rows"], ids=["plain-fp8", "comfy-scaled-fp8", "row-scaled-fp8"])
def test_float8_transformer_files_are_upcast_with_their_scales(tiny_checkpoints, tmp_path, scales):
    """Community "fp8" files: the E4M3 weights times their scales, exactly; within E4M3's rounding (2^-4 of each
    tensor's largest value, 2^-3 unscaled: small weights fall below E4M3's normal range) of the source weights."""
    root = tiny_checkpoints["dev"]
    bfl_sd = transformer_diffusers_to_bfl(Checkpoint.open(root).load_transformer(torch.float32).state_dict())
    meant = fp8_file(bfl_sd, tmp_path / "fp8.safetensors", scales)
    from fluxrt.export import bfl

    want = bfl.transformer_bfl_to_diffusers(meant)[0]
    got = Checkpoint.open(root, transformer_file=tmp_path / "fp8.safetensors").load_transformer(torch.float32)
    source = Checkpoint.open(root).load_transformer(torch.float32).state_dict()
    for k, v in got.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)
        bound = source[k].abs().max() * (2 ** -3 if scales is None else 2 ** -4)
        assert (v - source[k]).abs().max() <= bound + 1e-6, k


def test_float8_scales_that_fit_no_weight_are_refused_by_name(tiny_checkpoints, tmp_path):
    root = tiny_checkpoints["dev"]
    bfl_sd = transformer_diffusers_to_bfl(Checkpoint.open(root).load_transformer(torch.float32).state_dict())
    fp8_file(bfl_sd, tmp_path / "ok.safetensors", "comfy")
    state = load_file(tmp_path / "ok.safetensors")
    save_file(dict(state, **{"txt_in.scale_weight": torch.ones(3)}), tmp_path / "shape.safetensors")
    with pytest.raises(CheckpointError, match=r"scale 'txt_in.scale_weight' has shape \[3\]; for the float8 weight "
                                              r"'txt_in.weight' of shape \[\d+, \d+\] expected one value or one per "
                                              r"output row"):
        Checkpoint.open(root, transformer_file=tmp_path / "shape.safetensors").load_transformer(torch.float32)
    save_file(dict(state, **{"img_in.bias.scale_weight": torch.ones(1)}), tmp_path / "orphan.safetensors")
    with pytest.raises(CheckpointError, match=r"weight scales without a float8 weight beside them: "
                                              r"\['img_in.bias.scale_weight'\]"):
        Checkpoint.open(root, transformer_file=tmp_path / "orphan.safetensors").load_transformer(torch.float32)
