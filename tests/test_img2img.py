"""Image-to-image in the runtime against diffusers' ``FluxImg2ImgPipeline``: the same schedule slice, the same
start latents and the same images from the same noise; strength's edge cases; the errors, of the API and the CLI."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from cli_calls import cli
from fluxrt.errors import EngineError, ExportError, InvalidInputError
from fluxrt.runtime import FluxPipeline, memory, sampling
from fluxrt.runtime.params import DEFAULT_STRENGTH, GuidanceIgnoredWarning

# float32 ONNX Runtime vs float32 torch through the VAE encoder, the loop and the decoder, images in [0, 1]: the
# cases below measured at most 8e-6; the bound is test_runtime's for text-to-image. One step off in the schedule,
# or a sampled rather than mean latent, moves the images by more than 1e-2.
IMAGE_TOL = 2e-4


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """float32 [H, W, 3] in [0, 1]: smooth colour ramps with some texture, not noise alone."""
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    texture = np.random.default_rng(seed).random((height, width, 3))
    ramps = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * (x + y))], axis=-1)
    return (0.7 * ramps + 0.3 * texture).astype(np.float32)


def to_pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray((image * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def diffusers_img2img(tiny_checkpoints):
    from diffusers import FluxImg2ImgPipeline

    return {v: FluxImg2ImgPipeline.from_pretrained(tiny_checkpoints[v], local_files_only=True)
            for v in ("dev", "schnell", "trained")}


@pytest.fixture(scope="module")
def pipes(fp32_exports):
    return {v: FluxPipeline.load(fp32_exports[v], backend="ort-cpu") for v in ("dev", "schnell", "trained")}


# (variant, prompts, images per prompt, height, width, steps, strength, image kind)
CASES = [
    ("dev", ["a red fox in the snow"], 1, 48, 80, 4, 0.6, "array"),  # non-square, diffusers' default strength
    ("dev", ["a red fox in the snow"], 1, 48, 80, 4, 1.0, "pil"),  # all the steps, from pure noise
    ("dev", ["a lighthouse on a cliff"], 1, 64, 64, 4, 0.25, "array"),  # one step: t_start 3
    ("dev", ["a koi pond", "two cats under neon lights"], 1, 32, 48, 5, 0.5, "list"),  # one image per prompt
    ("dev", ["a paper boat"], 2, 32, 32, 3, 0.7, "array"),  # one image for both images of the prompt
    ("schnell", ["a red bicycle"], 1, 48, 32, 4, 0.6, "array"),
    ("trained", ["a red circle on a blue background"], 1, 64, 64, 6, 0.6, "array"),  # the trained weights
]


@pytest.mark.parametrize("case", CASES, ids=["nonsquare-0.6", "pil-1.0", "one-step-0.25", "per-prompt", "n2-0.7",
                                             "schnell", "trained"])
def test_images_equal_diffusers_img2img(case, diffusers_img2img, pipes, monkeypatch):
    """diffusers draws its noise with ``randn_tensor(shape, generator)`` after encoding the image; the encoding is
    made the posterior mean (``retrieve_latents`` with ``sample_mode="argmax"``, the exported encoder's output)
    so that it draws nothing from the generator, and the noise is then ``torch.randn`` of the unpacked latent shape
    from a fresh generator of the same seed. fluxrt is given that noise, packed with diffusers' own
    ``_pack_latents``, as ``latents`` (diffusers takes ``latents`` as the start latent itself, so it gets the
    generator instead). The noise diffusers drew is recorded and checked to be that one, bit for bit."""
    import diffusers.pipelines.flux.pipeline_flux_img2img as img2img

    variant, prompts, n, height, width, steps, strength, kind = case
    theirs = diffusers_img2img[variant]
    monkeypatch.setattr(img2img, "retrieve_latents", functools.partial(img2img.retrieve_latents, sample_mode="argmax"))
    drawn = []
    randn = img2img.randn_tensor
    monkeypatch.setattr(img2img, "randn_tensor", lambda *a, **k: drawn.append(randn(*a, **k)) or drawn[-1])
    arrays = [picture(height, width, seed=i) for i in range(len(prompts))]
    image = {"array": arrays[0], "pil": to_pil(arrays[0]), "list": arrays}[kind]
    batch, seed = len(prompts) * n, steps
    noise = torch.randn(batch, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))
    packed = theirs._pack_latents(noise, batch, 16, height // 8, width // 8).numpy()
    want = theirs(prompts, image=image, strength=strength, num_images_per_prompt=n, height=height, width=width,
                  num_inference_steps=steps, guidance_scale=2.5, max_sequence_length=24, output_type="np",
                  generator=torch.Generator().manual_seed(seed)).images
    assert len(drawn) == 1 and torch.equal(drawn[0], noise)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GuidanceIgnoredWarning)
        out = pipes[variant](prompts, image=image, strength=strength, num_images_per_prompt=n,
                             num_inference_steps=steps, guidance_scale=2.5, max_sequence_length=24, latents=packed,
                             output_type="np")
    got = out.images
    assert got.shape == want.shape == (batch, height, width, 3)
    assert np.abs(got - want).max() < IMAGE_TOL
    assert want.std() > 1e-2  # the comparison is not between two blank images
    assert out.settings["strength"] == strength and (out.settings["height"], out.settings["width"]) == (height, width)
    if strength < 1:  # the image shows through: text-to-image from the same noise is another picture
        t2i = pipes[variant](prompts, num_images_per_prompt=n, height=height, width=width,
                             num_inference_steps=steps, max_sequence_length=24, latents=packed,
                             output_type="np").images
        assert np.abs(got - t2i).max() > 1e-2


def test_start_step_and_sigma_are_diffusers_get_timesteps(diffusers_img2img, pipes):
    """For every N and strength, fluxrt runs diffusers' steps: the same count, from the same sigma
    (``scheduler.sigmas[begin_index]``, which ``scale_noise`` uses), through the same sigmas (diffusers'
    timesteps are sigmas * 1000)."""
    from diffusers.pipelines.flux.pipeline_flux_img2img import calculate_shift

    theirs = diffusers_img2img["dev"]
    config = pipes["dev"].scheduler_config
    seq = 15  # 48x80
    mu = calculate_shift(seq, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"],
                         config["max_shift"])
    for steps in (1, 2, 3, 4, 7, 10, 28):
        sigmas = sampling.get_sigmas(steps, seq, config)
        for strength in (1e-3, 0.1, 0.25, 0.3, 1 / 3, 0.5, 0.6, 0.7, 0.9, 0.999, 1.0):
            theirs.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            timesteps, count = theirs.get_timesteps(steps, strength, "cpu")
            start = sampling.start_step(steps, strength)
            assert count == steps - start >= 1, (steps, strength)
            assert sigmas[start] == theirs.scheduler.sigmas[theirs.scheduler.begin_index].item()
            np.testing.assert_allclose(sigmas[start:-1], timesteps.numpy() / 1000, rtol=0, atol=1e-6)
    assert sampling.start_step(4, 0.25) == 3 and sampling.start_step(4, 0.6) == 1 and sampling.start_step(28, 0.6) == 11
    assert sampling.start_step(4, 0.0) == 4 and sampling.start_step(4, 1.0) == 0


def test_strength_one_is_text_to_image_bit_for_bit(pipes):
    """At strength 1 the start sigma is sigmas[0] = 1, so the start is the noise itself: the same images as
    text-to-image from the same latents, or from the same seed, bit for bit."""
    pipe = pipes["dev"]
    image = picture(48, 80, seed=3)
    assert sampling.get_sigmas(3, 15, pipe.scheduler_config)[0] == 1.0
    noise = pipe.initial_latents(pipe.params("x", height=48, width=80, seed=9))
    args = dict(prompt="a lighthouse", num_inference_steps=3, max_sequence_length=16, output_type="np")
    t2i = pipe(height=48, width=80, latents=noise, **args).images
    np.testing.assert_array_equal(pipe(image=image, strength=1.0, latents=noise, **args).images, t2i)
    np.testing.assert_array_equal(pipe(image=image, strength=1.0, seed=9, **args).images, t2i)
    np.testing.assert_array_equal(pipe(height=48, width=80, seed=9, **args).images, t2i)


def test_small_strength_runs_one_step_and_records_the_call(pipes):
    pipe = pipes["dev"]
    image = picture(32, 48, seed=1)
    seen = []
    out = pipe("a fox", image=image, strength=0.25, num_inference_steps=4, max_sequence_length=16, seed=4,
               callback=lambda i, n: seen.append((i, n)), output_type="np")
    assert seen == [(1, 1)]
    assert out.images.shape == (1, 32, 48, 3)  # height and width taken from the image
    assert out.settings["strength"] == 0.25 and out.settings["seed"] == 4
    assert out.settings["image_sha256"] == hashlib.sha256(image[None].tobytes()).hexdigest()
    assert set(out.timings) == {"clip", "t5", "vae_encoder", "transformer", "vae_decoder", "total"}
    assert out.timings["vae_encoder"] > 0
    default = pipe("a fox", image=image, num_inference_steps=4, max_sequence_length=16, seed=4, output_type="np")
    assert default.settings["strength"] == DEFAULT_STRENGTH == 0.6
    t2i = pipe("a fox", height=32, width=48, num_inference_steps=1, seed=4)
    assert "strength" not in t2i.settings and "vae_encoder" not in t2i.timings


def test_diffusers_default_strength_and_refusals(diffusers_img2img):
    """What fluxrt follows: the default strength 0.6, and strengths outside [0, 1] or running no step refused."""
    import inspect

    theirs = diffusers_img2img["dev"]
    assert inspect.signature(type(theirs).__call__).parameters["strength"].default == DEFAULT_STRENGTH
    args = dict(image=picture(32, 32, 0), height=32, width=32, num_inference_steps=4, max_sequence_length=8)
    with pytest.raises(ValueError, match="strength should in"):
        theirs("a", strength=1.5, **args)
    with pytest.raises(ValueError, match="number of pipelinesteps is 0"):
        theirs("a", strength=0.0, **args)


def test_one_image_per_prompt_pairs_with_that_prompts_images(pipes):
    """Image i serves prompt i's num_images_per_prompt images (prompt-major): the batch equals each prompt alone.
    (diffusers tiles the images instead, img0 img1 img0 img1, when there are several prompts and several images
    per prompt.)"""
    pipe = pipes["dev"]
    prompts, images = ["a koi pond", "a red bicycle"], [picture(32, 32, 0), picture(32, 32, 1)]
    noise = pipe.initial_latents(pipe.params(prompts, height=32, width=32, num_images_per_prompt=2, seed=1))
    args = dict(num_inference_steps=3, max_sequence_length=16, output_type="np", strength=0.6)
    both = pipe(prompts, image=np.stack(images), num_images_per_prompt=2, latents=noise, **args).images
    for i in range(2):
        alone = pipe(prompts[i], image=images[i], num_images_per_prompt=2, latents=noise[2 * i:2 * i + 2],
                     **args).images
        assert np.abs(both[2 * i:2 * i + 2] - alone).max() < 1e-5
    assert np.abs(both[0] - both[2]).max() > 1e-2


def test_encoder_runner_is_made_on_first_use_and_is_one_of_the_runners(fp32_exports):
    from fluxrt.artifacts import ExportFolder
    from fluxrt.export.torch_runner import torch_runners

    image = picture(32, 32, 0)
    args = dict(prompt="a fox", num_inference_steps=2, max_sequence_length=8, seed=0, output_type="np")
    pipe = FluxPipeline.load(fp32_exports["dev"])
    pipe(height=32, width=32, **args)
    assert "vae_encoder" not in pipe.runners
    ort = pipe(image=image, **args).images
    assert pipe.runners["vae_encoder"].backend == "ort-cpu"
    assert FluxPipeline.load(fp32_exports["dev"], vae_encoder=True).runners["vae_encoder"].backend == "ort-cpu"
    folder = ExportFolder.open(fp32_exports["dev"])
    torch_encoder = FluxPipeline.load(fp32_exports["dev"], runners=torch_runners(folder, ("vae_encoder",)))
    assert torch_encoder.runners["vae_encoder"].backend == "torch"
    assert np.abs(torch_encoder(image=image, **args).images - ort).max() < IMAGE_TOL
    with pytest.raises(InvalidInputError, match="backend 'trt' for vae_encoder needs an engine folder"):
        FluxPipeline.load(fp32_exports["dev"], backend={"vae_encoder": "trt"})(image=image, **args)
    est = memory.estimate(folder, pipe.params("a", height=64, width=64), encoder_images=2)
    # the tiny VAE's encoder (levels of 8, 8, 16, 16 channels): its widest tensor is 8 x 64 x 64, float32, x4
    assert est["vae_encoder"] == 4 * 4 * 2 * 8 * 64 * 64
    assert "vae_encoder" not in memory.estimate(folder, pipe.params("a", height=64, width=64))


@pytest.fixture(scope="module")
def rgba():
    from PIL import Image

    return Image.new("RGBA", (32, 32)), Image.new("L", (32, 32))


def bad_images():
    ok = picture(32, 32, 0)
    return [
        (dict(image=picture(48, 80, 0), height=32, width=32),
         r"image is 48x80 pixels \(height x width\), but the call asks for 32x32: fluxrt does not resize"),
        (dict(image=picture(48, 80, 0), height=64),
         r"image is 48x80 pixels \(height x width\), but the call asks for 64x80"),
        (dict(image=picture(40, 32, 0)),
         r"image is 40x32 pixels \(height x width\); the call takes its height from it, and height must be a "
         r"multiple of 16 pixels"),
        (dict(image=np.where(ok > 0.5, np.nan, ok).astype(np.float32)), "image contains NaN or Inf"),
        (dict(image=ok * 1.5), r"image has values in \[0\.\d+, 1\.\d+\], expected \[0, 1\] \(fluxrt does not clamp\)"),
        (dict(image=ok - 0.1), r"image has values in \[-0\.\d+, 0\.\d+\], expected \[0, 1\]"),
        (dict(image=ok.astype(np.float64)), "image has dtype float64, expected float32 with values in"),
        (dict(image=(ok * 255).astype(np.uint8)), "image has dtype uint8, expected float32"),
        (dict(image=ok[..., 0]), r"image has shape \(32, 32\), expected \[H, W, 3\] or \[B, H, W, 3\]"),
        (dict(image=np.zeros((32, 32, 4), np.float32)), r"image has shape \(32, 32, 4\), expected"),
        (dict(image=[ok, ok[None]]), r"image\[1\] has shape \(1, 32, 32, 3\), expected \[H, W, 3\]: RGB"),
        (dict(image=[ok, picture(48, 48, 0)]), "image holds images of different sizes"),
        (dict(image=[]), "image must be an image or a non-empty list of images"),
        (dict(image=torch.zeros(32, 32, 3)), "image must be a PIL RGB image or a float32 numpy array"),
        (dict(image=["x.png"]), r"image\[0\] must be a PIL RGB image .* got str"),
        (dict(image=[ok, ok, ok]), r"image holds 3 images; give one \(for every prompt\) or one per prompt \(1\)"),
        (dict(image=ok, strength=-0.1), r"strength must be a finite number in \[0, 1\], got -0\.1"),
        (dict(image=ok, strength=1.5), r"strength must be a finite number in \[0, 1\], got 1\.5"),
        (dict(image=ok, strength=float("nan")), r"strength must be a finite number in \[0, 1\], got nan"),
        (dict(image=ok, strength=True), r"strength must be a finite number in \[0, 1\], got True"),
        (dict(image=ok, strength="0.5"), r"strength must be a finite number in \[0, 1\], got '0\.5'"),
        (dict(strength=2.0, height=32, width=32), r"strength must be a finite number in \[0, 1\], got 2\.0"),
        (dict(image=ok, strength=0.0), r"strength 0\.0 runs none of the 4 denoising steps \(image-to-image starts at "
                                       r"step 4 of 4"),
        (dict(image=ok, strength=1e-20), "strength 1e-20 runs none of the 4 denoising steps"),
    ]


@pytest.mark.parametrize("kwargs,message", bad_images())
def test_image_and_strength_errors_before_any_stage(pipes, kwargs, message):
    pipe = pipes["dev"]
    calls = []
    clip = pipe.runners["clip"]
    original = clip.infer
    clip.infer = lambda feed: calls.append(feed) or original(feed)
    try:
        with pytest.raises(InvalidInputError, match=message):
            pipe(**dict(dict(prompt="a", num_inference_steps=4, max_sequence_length=8), **kwargs))
    finally:
        del clip.infer
    assert calls == []


def test_pil_modes_other_than_rgb_are_refused(pipes, rgba):
    for image, mode in zip(rgba, ("RGBA", "L")):
        with pytest.raises(InvalidInputError, match=rf"image is a PIL image in mode '{mode}', expected 'RGB' "
                                                    rf"\(convert it with image.convert\('RGB'\)\)"):
            pipes["dev"]("a", image=image, num_inference_steps=1)


def test_folders_without_the_encoder_are_refused_by_name(fp32_exports, tmp_path):
    """An export folder without a vae_encoder graph generates text-to-image, and refuses an image (at load when the
    encoder is asked for); an engine folder without its plan is refused before TensorRT is needed."""
    from fluxrt.artifacts import EngineFolder
    from fluxrt.runtime.backends import make_runner

    folder = shutil.copytree(fp32_exports["dev"], tmp_path / "onnx", ignore=shutil.ignore_patterns("vae_encoder.*"))
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["components"]["vae_encoder"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    pipe = FluxPipeline.load(folder)
    assert pipe("a", height=32, width=32, num_inference_steps=1, output_type="np").images.shape == (1, 32, 32, 3)
    message = (rf"image-to-image needs the vae_encoder stage, and export folder {folder} has no vae_encoder graph "
               rf"\(it has \['clip', 't5', 'transformer', 'vae_decoder'\]\): export the VAE again with fluxrt export "
               rf"--components vae")
    with pytest.raises(ExportError, match=message):
        pipe("a", image=picture(32, 32, 0), num_inference_steps=1)
    with pytest.raises(ExportError, match=message):
        FluxPipeline.load(folder, vae_encoder=True)
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "engines.json").write_text(json.dumps({
        "format": "fluxrt-engines/2", "precision": "fp16", "dims": manifest["dims"],
        "envelope": {"batch": [1, 1, 1], "text_length": [1, 512, 512], "image_side": [512, 1024, 1024]},
        "components": ["clip", "t5", "transformer", "vae_decoder"]}))
    with pytest.raises(EngineError, match=rf"image-to-image needs the vae_encoder stage, and engine folder {engines} "
                                          rf"has no vae_encoder plan .*fluxrt build EXPORT --out {engines} "
                                          rf"--components vae_encoder --precision fp16"):
        make_runner(EngineFolder.open(engines), "vae_encoder", "trt")


def one_line_error(code: int, stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fluxrt generate: error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_cli_image_to_image_writes_the_api_pixels(fp32_exports, pipes, tmp_path):
    from PIL import Image

    source = tmp_path / "in.png"
    to_pil(picture(48, 32, 5)).save(source)
    out = tmp_path / "out.png"
    code, err = cli(["generate", "--onnx", fp32_exports["dev"], "--prompt", "a paper boat", "--out", out,
                     "--image", source, "--strength", "0.5", "--steps", "3", "--seed", "2",
                     "--max-sequence-length", "16"])
    assert code == 0, err
    written = Image.open(out)
    with Image.open(source) as f:
        api = pipes["dev"]("a paper boat", image=f.convert("RGB"), strength=0.5, num_inference_steps=3, seed=2,
                           max_sequence_length=16)
    np.testing.assert_array_equal(np.asarray(written), np.asarray(api.images[0]))
    assert written.size == (32, 48)  # width x height, the image's own
    assert written.text["fluxrt:strength"] == "0.5" and written.text["fluxrt:height"] == "48"
    assert written.text["fluxrt:image_file_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert written.text["fluxrt:image_sha256"] == api.settings["image_sha256"]
    assert json.loads(written.text["fluxrt:backends"])["vae_encoder"] == "ort-cpu"


def test_cli_image_errors(fp32_exports, tmp_path):
    source = tmp_path / "in.png"
    to_pil(picture(48, 32, 5)).save(source)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    base = ["generate", "--onnx", fp32_exports["dev"], "--prompt", "a", "--out", tmp_path / "o.png", "--steps", "2"]
    one_line_error(*cli(base + ["--strength", "0.5"]), "--strength", "needs --image FILE")
    one_line_error(*cli(base + ["--image", text]), f"--image {text} cannot be read as an image (PNG or JPEG): "
                                                   f"cannot identify image file")
    one_line_error(*cli(base + ["--image", tmp_path / "missing.png"]), "--image", "No such file or directory")
    one_line_error(*cli(base + ["--image", source, "--height", "32"]),
                   f"--image {source} is 32 pixels wide and 48 high, but --width 32 --height 32 ask for another "
                   f"size: fluxrt does not resize")
    one_line_error(*cli(base + ["--image", source, "--strength", "1.5"]),
                   "--strength must be a finite number in [0, 1], got 1.5")
    one_line_error(*cli(base + ["--image", source, "--strength", "0"]), "--strength 0.0 runs none of the 2 denoising")
    odd = tmp_path / "odd.png"
    to_pil(picture(40, 32, 5)).save(odd)
    one_line_error(*cli(base + ["--image", odd]), f"--image {odd} is 32 pixels wide and 40 high; its sides must be "
                                                  f"multiples of 16 pixels")
    assert not (tmp_path / "o.png").exists()
