"""The trained tiny model's data, its adherence check and its training code (``fluxrt train-tiny``), on the CPU.

The judge is tested on the renderer's own pictures (every scene passes) and on pictures that say something else
(another colour, shape, place or background: each fails), so that a rate measured with it means something."""

from __future__ import annotations

import json
import platform

import numpy as np
import pytest

from fluxrt.train import adherence, shapes
from fluxrt.train.shapes import Scene


def u8(images: np.ndarray) -> np.ndarray:
    return (images * 255 + 0.5).astype(np.uint8)


def test_dataset_is_deterministic_and_covers_the_grammar():
    a_scenes, a = shapes.dataset(300, 64, seed=5)
    b_scenes, b = shapes.dataset(300, 64, seed=5)
    assert a_scenes == b_scenes and np.array_equal(a, b)
    assert not np.array_equal(shapes.dataset(300, 64, seed=6)[1], a)
    assert a.shape == (300, 64, 64, 3) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert {s.colour for s in a_scenes} == set(shapes.COLOURS) and {s.shape for s in a_scenes} == set(shapes.SHAPES)
    assert {s.position for s in a_scenes} == {None, *shapes.POSITIONS}
    assert len(shapes.all_scenes()) == 450 and len({s.caption for s in shapes.all_scenes()}) == 450
    assert Scene("red", "circle", "blue").caption == "a red circle on a blue background"
    assert Scene("red", "circle", "blue", "top left").caption == "a red circle on a blue background, top left"
    # plain RGB: a background pixel far from the shape is exactly its colour
    scene, image = Scene("yellow", "square", "blue", "top left"), shapes.render([Scene("yellow", "square", "blue",
                                                                                       "top left")], 64,
                                                                                np.random.default_rng(0))[0]
    assert np.array_equal(u8(image)[60, 60], [0, 0, 255]) and scene.background == "blue"


@pytest.mark.parametrize("bad, message", [
    (dict(colour="purple"), "colour 'purple'"), (dict(shape="star"), "shape 'star'"),
    (dict(position="middle"), "position 'middle'"), (dict(background="red"), "both 'red'"),
])
def test_scene_refuses_what_the_grammar_lacks(bad, message):
    with pytest.raises(ValueError, match=message):
        Scene(**dict(dict(colour="red", shape="circle", background="blue"), **bad))


@pytest.mark.parametrize("side", [64, 128])
def test_judge_passes_every_rendered_scene_and_fails_the_wrong_ones(side):
    rng = np.random.default_rng(1)
    scenes = shapes.all_scenes()[::3]
    images = u8(shapes.render(scenes, side, rng))
    assert adherence.rate(images, scenes) == 1.0
    names = list(shapes.COLOURS)
    wrong = []
    for s in scenes:
        other = next(c for c in names if c not in (s.colour, s.background))
        shape = shapes.SHAPES[(shapes.SHAPES.index(s.shape) + 1) % 3]
        place = "bottom right" if s.position in (None, "top left") else "top left"
        wrong.append([Scene(other, s.shape, s.background, s.position), Scene(s.colour, shape, s.background, s.position),
                      Scene(s.colour, s.shape, s.background, place),
                      Scene(s.colour, s.shape, next(c for c in names if c not in (s.colour, s.background)),
                            s.position)])
    for k in range(4):  # what the picture shows is judged against a caption that says otherwise
        assert adherence.rate(images, [w[k] for w in wrong]) < 0.05, k
    noise = np.random.default_rng(2).integers(0, 256, images.shape, dtype=np.uint8)
    assert adherence.rate(noise, scenes) == 0.0


def test_train_tiny_writes_a_checkpoint_diffusers_and_fluxrt_open(tmp_path):
    """A few steps of every phase on the CPU: the folder is a FLUX.1-dev checkpoint in the diffusers layout with
    the VAE factors computed from the data and its training record."""
    from diffusers import FluxPipeline

    from fluxrt.export.checkpoint import Checkpoint
    from fluxrt.train.tiny import TrainSettings, train_tiny

    settings = TrainSettings(images=32, vae_steps=3, vae_batch=4, flow_steps=3, distill_steps=2, batch=4)
    lines = []
    out = train_tiny(tmp_path / "trained", "cpu", settings, say=lines.append)
    record = json.loads((out / "training.json").read_text())
    assert record["settings"]["flow_steps"] == 3 and len(record["flow_loss"]) == 1 and len(record["distill_loss"]) == 1
    assert {"torch", "diffusers", "transformers"} <= set(record["versions"])
    assert record["device"] == "cpu" and record["device_name"] == (platform.processor() or platform.machine())
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert vae_config["shift_factor"] == round(record["vae_factors"]["shift_factor"], 6)
    assert vae_config["latent_channels"] == 16 and vae_config["norm_num_groups"] == 32
    ckpt = Checkpoint.open(out)
    assert ckpt.dims().variant == "dev"
    pipe = FluxPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.transformer.config.guidance_embeds and pipe.transformer.config.num_single_layers == 3
    assert any("vae step 3/3" in line for line in lines)
    with pytest.raises(Exception, match="already exists"):
        train_tiny(out, "cpu", settings)


def test_tiny_model_trained_writes_the_shipped_files_and_refuses_a_seed(tmp_path, monkeypatch):
    from cli_calls import cli

    from fluxrt.export import tiny

    shipped = tmp_path / "shipped"
    (shipped / "dev" / "vae").mkdir(parents=True)
    (shipped / "dev" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    (shipped / "dev" / "vae" / "config.json").write_text("{}")
    monkeypatch.setattr(tiny, "TRAINED", shipped)
    code, err = cli(["tiny-model", tmp_path / "out", "--trained"])
    assert code == 0, err
    for f in ("model_index.json", "vae/config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (shipped / "dev" / f).read_bytes()
    code, err = cli(["tiny-model", tmp_path / "out2", "--trained", "--seed", "3"])
    assert code == 2 and "--seed draws random weights; --trained" in err
    code, err = cli(["tiny-model", tmp_path / "out3", "--trained", "--variant", "schnell"])
    assert code == 2 and "no trained tiny schnell model ships with fluxrt (trained: ['dev'])" in err
    assert not (tmp_path / "out3").exists()
    code, err = cli(["tiny-model", tmp_path / "out", "--trained"])
    assert code == 2 and "already exists" in err
