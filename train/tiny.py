"""Train the built-in tiny FLUX.1-dev on the shapes of :mod:`fluxrt.train.shapes`: ``fluxrt train-tiny OUT``.

Three phases, all on the real diffusers modules at tiny width:

1. the VAE (``AutoencoderKL``, FLUX's layout: 16 latent channels, no quant convs, 32-group norms as BFL's
   autoencoder has them) as an autoencoder: L1 + MSE on the pixels and a small KL term; then its
   ``shift_factor`` and ``scaling_factor`` from the data (the mean of the latents, and one over their standard
   deviation after the shift);
2. the transformer with FLUX's rectified-flow objective on those latents: ``x_t = (1 - t) x_0 + t noise``, the
   target velocity ``noise - x_0``, ``t`` logit-normal and then shifted by the scheduler's resolution-dependent
   ``mu`` (the same shift the sampler applies), conditioned on the tiny CLIP and T5 encoders, which stay frozen
   as :mod:`fluxrt.export.tiny` makes them; the caption is dropped (the empty prompt) for 10% of the samples,
   the T5 length drawn per batch from 64..512 tokens so any text length works;
3. guidance distillation, approximated: a frozen copy of phase 2's model is the teacher, and the student (the
   same weights, continued) learns ``v_uncond + g (v_cond - v_uncond)`` with the guidance ``g`` drawn in
   [0, 6] fed to its guidance embedding, as FLUX.1-dev is distilled from classifier-free guidance.

The result is a diffusers-layout checkpoint folder with ``training.json`` (settings, data seed, steps, loss
curves, library versions, device, seconds).  Nothing here is imported by the runtime.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fluxrt.runtime.sampling import calculate_shift, image_ids
from fluxrt.train.shapes import all_scenes, dataset

VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 64, 64),
           layers_per_block=1, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
           sample_size=64)
TRANSFORMER = dict(num_layers=2, num_single_layers=3, attention_head_dim=32, num_attention_heads=3,
                   in_channels=64, axes_dims_rope=(4, 14, 14), guidance_embeds=True)
TEXT_LENGTHS = (64, 128, 256, 512)  # T5 tokens, one per batch (512: dev's default)
TEXT_LENGTH_WEIGHTS = (2, 1, 1, 1)


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0  # data, initialization and sampling
    sides: tuple = (64, 128)  # image sizes, pixels
    images: int = 8000  # rendered scenes per side
    vae_steps: int = 4000
    vae_batch: int = 64
    flow_steps: int = 9000
    distill_steps: int = 1500
    batch: int = 256
    lr: float = 5e-4
    caption_dropout: float = 0.1
    max_guidance: float = 6.0

    def scaled(self, factor: float) -> "TrainSettings":
        """The same recipe with every phase's steps times ``factor`` (at least 1 each)."""
        steps = {k: max(1, round(getattr(self, k) * factor)) for k in ("vae_steps", "flow_steps", "distill_steps")}
        return TrainSettings(**{**asdict(self), **steps})


def log_curve(curve: list, step: int, losses: list) -> None:
    curve.append([step, float(np.mean(losses))])
    losses.clear()


def cosine_lr(opt, step: int, total: int, lr: float, warmup: int = 100) -> None:
    scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
    for group in opt.param_groups:
        group["lr"] = lr * max(scale, 0.02)


def train_vae(vae, images: dict, settings: TrainSettings, device, gen, say) -> list:
    import torch

    opt = torch.optim.AdamW(vae.parameters(), lr=settings.lr * 2, weight_decay=0.0)
    curve, losses = [], []
    vae.train()
    for step in range(settings.vae_steps):
        side = settings.sides[step % len(settings.sides)]
        pool = images[side]
        idx = torch.randint(0, pool.shape[0], (settings.vae_batch,), generator=gen, device="cpu")
        x = pool[idx].to(device).float() / 127.5 - 1  # [B, 3, H, W] in [-1, 1]
        cosine_lr(opt, step, settings.vae_steps, settings.lr * 2)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        loss = (recon - x).abs().mean() + ((recon - x) ** 2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == settings.vae_steps:
            log_curve(curve, step + 1, losses)
            say(f"vae step {step + 1}/{settings.vae_steps} loss {curve[-1][1]:.4f}")
    vae.eval()
    return curve


def encode_all(vae, images, device, batch: int = 256):
    """Posterior means [K, 16, h, w] of ``images`` uint8 [K, 3, H, W]."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            x = images[i:i + batch].to(device).float() / 127.5 - 1
            out.append(vae.encode(x).latent_dist.mean.float())
    return torch.cat(out)


def text_bank(clip, clip_tok, t5, t5_tok, captions: list[str], device) -> dict:
    """Frozen text embeddings of every caption (and the empty one, last): CLIP pooled [C+1, 32] and, per
    length L in TEXT_LENGTHS, T5 [C+1, L, 32]: FluxPipeline's tokenization (padded to the length, truncated)."""
    import torch

    texts = captions + [""]
    with torch.no_grad():
        ids = clip_tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        pooled = clip.to(device)(ids.to(device), output_hidden_states=False).pooler_output.float()
        t5_out = {}
        for length in TEXT_LENGTHS:
            ids = t5_tok(texts, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids
            t5_out[length] = torch.cat([t5.to(device)(ids[i:i + 64].to(device))[0].float()
                                        for i in range(0, len(texts), 64)])
    return {"pooled": pooled, "t5": t5_out}


def flow_batch(latents: dict, caption_index: dict, bank: dict, settings: TrainSettings, scheduler: dict, step: int,
               gen, device, dropout: float):
    """One batch: packed clean latents x0 [B, N, 64], their noise, t [B], the text, ids; one side and one text
    length per batch."""
    import torch

    side = settings.sides[step % len(settings.sides)]
    pool, caps = latents[side], caption_index[side]
    idx = torch.randint(0, pool.shape[0], (settings.batch,), generator=gen)
    x0 = pool[idx].to(device)  # [B, 16, h, w], shifted and scaled
    b, c, h, w = x0.shape
    x0 = x0.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    mu = calculate_shift(x0.shape[1], scheduler["base_image_seq_len"], scheduler["max_image_seq_len"],
                         scheduler["base_shift"], scheduler["max_shift"])
    u = torch.sigmoid(torch.randn(b, generator=gen)).to(device)  # logit-normal
    t = math.exp(mu) / (math.exp(mu) + (1 / u - 1))  # the sampler's shift
    length = random.Random(settings.seed * 100_003 + step).choices(TEXT_LENGTHS, TEXT_LENGTH_WEIGHTS)[0]
    cap = caps[idx].clone()
    cap[torch.rand(b, generator=gen) < dropout] = bank["pooled"].shape[0] - 1  # the empty prompt
    cap = cap.to(device)
    text = bank["t5"][length][cap]
    img = torch.from_numpy(image_ids(side, side, 8)).to(device)
    txt = torch.zeros(length, 3, device=device)
    return x0, noise, t, bank["pooled"][cap], text, img, txt, cap, length


def velocity(model, x_t, t, pooled, text, img, txt, guidance):
    return model(hidden_states=x_t, timestep=t, guidance=guidance, pooled_projections=pooled,
                 encoder_hidden_states=text, img_ids=img, txt_ids=txt, return_dict=False)[0]


def train_flow(model, latents, caption_index, bank, settings: TrainSettings, scheduler: dict, device, gen, say,
               teacher=None) -> list:
    """Phase 2 (``teacher`` None: the data's velocity, guidance 1) or phase 3 (the teacher's guided velocity)."""
    import torch

    steps = settings.flow_steps if teacher is None else settings.distill_steps
    lr = settings.lr if teacher is None else settings.lr * 0.3
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    empty = bank["pooled"].shape[0] - 1
    curve, losses = [], []
    model.train()
    for step in range(steps):
        x0, noise, t, pooled, text, img, txt, cap, length = flow_batch(
            latents, caption_index, bank, settings, scheduler, step, gen, device,
            settings.caption_dropout if teacher is None else 0.0)
        b = x0.shape[0]
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        cosine_lr(opt, step, steps, lr)
        if teacher is None:
            g = torch.ones(b, device=device)
            target = noise - x0
        else:
            g = torch.rand(b, generator=gen).to(device) * settings.max_guidance
            with torch.no_grad():
                ones = torch.ones(b, device=device)
                v_c = velocity(teacher, x_t, t, pooled, text, img, txt, ones).float()
                un = torch.full_like(cap, empty)
                v_u = velocity(teacher, x_t, t, bank["pooled"][un], bank["t5"][length][un], img, txt, ones).float()
            target = v_u + g[:, None, None] * (v_c - v_u)
        pred = velocity(model, x_t, t, pooled, text, img, txt, g)
        loss = ((pred.float() - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log_curve(curve, step + 1, losses)
            say(f"{'flow' if teacher is None else 'distill'} step {step + 1}/{steps} loss {curve[-1][1]:.4f}")
    model.eval()
    return curve


def versions() -> dict:
    import diffusers
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__}


def device_name(dev) -> str:
    """The processor the recipe ran on: the GPU's name (torch.cuda.get_device_name) or the CPU's."""
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine()


def train_tiny(out: str | Path, device: str = "cpu", settings: TrainSettings = TrainSettings(),
               say=lambda line: None) -> Path:
    """Train and write the checkpoint folder ``out`` (atomically; it must not exist or be empty)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from fluxrt.export.tiny import SCHEDULER_CONFIGS, save_checkpoint, text_encoders, write_checkpoint

    dev = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    begin = time.perf_counter()
    report = say

    def say(line: str) -> None:
        report(f"[{time.perf_counter() - begin:6.0f} s] {line}")

    def make(staging: Path) -> Path:
        clip, clip_tok, t5, t5_tok, _ = text_encoders(settings.seed, staging / "_tokenizers")
        torch.manual_seed(settings.seed)
        gen = torch.Generator().manual_seed(settings.seed)
        record = {"settings": asdict(settings), "device": str(dev), "device_name": device_name(dev),
                  "versions": versions(),
                  "text_encoders": "fluxrt.export.tiny.text_encoders(seed), frozen"}
        images, caption_index = {}, {}
        scenes = all_scenes()
        captions = [s.caption for s in scenes]
        where = {c: i for i, c in enumerate(captions)}
        for k, side in enumerate(settings.sides):
            drawn, pixels = dataset(settings.images, side, settings.seed * 1000 + k)
            u8 = (pixels * 255 + 0.5).astype(np.uint8)  # what a PNG of the scene holds
            images[side] = torch.from_numpy(u8).permute(0, 3, 1, 2).contiguous()  # [K, 3, H, W]
            caption_index[side] = torch.tensor([where[s.caption] for s in drawn])
        say(f"rendered {settings.images} scenes at each of {settings.sides} px")

        vae = AutoencoderKL(**VAE).to(dev)
        record["vae_loss"] = train_vae(vae, images, settings, dev, gen, say)
        raw = {side: encode_all(vae, images[side], dev) for side in settings.sides}
        every = torch.cat([r.flatten() for r in raw.values()])
        shift = float(every.mean())
        scale = float(1 / (every - shift).std())
        vae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(scale, 6))
        latents = {side: ((r - shift) * scale).cpu() for side, r in raw.items()}
        record["vae_factors"] = {"shift_factor": shift, "scaling_factor": scale}
        say(f"vae shift_factor {shift:.4f} scaling_factor {scale:.4f}")

        bank = text_bank(clip.eval(), clip_tok, t5.eval(), t5_tok, captions, dev)
        scheduler = SCHEDULER_CONFIGS["dev"]
        model = FluxTransformer2DModel(**TRANSFORMER, joint_attention_dim=t5.config.d_model,
                                       pooled_projection_dim=clip.config.hidden_size).to(dev)
        record["flow_loss"] = train_flow(model, latents, caption_index, bank, settings, scheduler, dev, gen, say)
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        record["distill_loss"] = train_flow(model, latents, caption_index, bank, settings, scheduler, dev, gen, say,
                                            teacher=teacher)
        record["seconds"] = round(time.perf_counter() - begin, 1)

        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**scheduler), vae=vae.cpu().float(),
                            text_encoder=clip.cpu(), tokenizer=clip_tok, text_encoder_2=t5.cpu(), tokenizer_2=t5_tok,
                            transformer=model.cpu().float())
        folder = save_checkpoint(pipe, staging, staging / "_tokenizers", max_shard_size=None)
        (folder / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        return folder

    return write_checkpoint(out, make)
