"""The built-in tiny model: a complete FLUX.1 checkpoint in the diffusers layout with the
real architecture at tiny width and depth, seeded random weights and working tokenizers.

It is written by diffusers' own ``FluxPipeline.save_pretrained``, so the layout is the real
one; the transformer is sharded so the shard-index path is exercised too.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from fluxrt.components import VARIANTS
from fluxrt.errors import CheckpointError
from fluxrt.export.quiet import quiet_hf

# FLUX.1's published scheduler configs
SCHEDULER_CONFIGS = {
    "dev": dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True),
    "schnell": dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
}
TINY_WIDTH = 32  # CLIP hidden size = T5 d_model = the transformer's text widths
TINY_TRANSFORMER = dict(num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
                        in_channels=64, joint_attention_dim=TINY_WIDTH, pooled_projection_dim=TINY_WIDTH,
                        axes_dims_rope=(4, 14, 14))
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
                layers_per_block=1, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
                scaling_factor=0.3611, shift_factor=0.1159, sample_size=64)
TRAINED = Path(__file__).parent / "trained"  # the shipped trained tiny models, one folder per variant (train/)


def perturb(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Default inits leave norms at exactly 1 and many biases at 0, which would hide a swapped
    or dropped weight in the tests: add seeded noise to every parameter."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return module.eval()


def text_encoders(seed: int, tokenizer_dir: Path):
    """The tiny CLIP and T5 with their tokenizers (written to ``tokenizer_dir``): ``(clip, clip_tokenizer, t5,
    t5_tokenizer, generator)``, the generator the one that perturbed them, for the modules made after them."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    from fluxrt.export.tokenizers_tiny import write_tiny_tokenizers

    write_tiny_tokenizers(tokenizer_dir / "clip", tokenizer_dir / "t5", seed=seed)
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir / "clip")
    tok2 = T5TokenizerFast.from_pretrained(tokenizer_dir / "t5")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=TINY_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=TINY_WIDTH,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        hidden_act="quick_gelu"))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tok2), d_model=TINY_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id, decoder_start_token_id=0,
        is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False))
    for m in (clip, t5):
        perturb(m, g)
    return clip, tok, t5, tok2, g


def build_pipeline(variant: str, seed: int, tokenizer_dir: Path):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip, tok, t5, tok2, g = text_encoders(seed, tokenizer_dir)
    transformer = FluxTransformer2DModel(**TINY_TRANSFORMER, guidance_embeds=variant == "dev")
    vae = AutoencoderKL(**TINY_VAE)
    for m in (transformer, vae):
        perturb(m, g)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[variant]), vae=vae,
                        text_encoder=clip, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok2,
                        transformer=transformer)


def save_checkpoint(pipe, staging: Path, tokenizer_dir: Path, max_shard_size: str | None) -> Path:
    """``pipe`` saved by diffusers into ``staging / "model"`` with the tokenizer files real FLUX folders carry
    (from ``tokenizer_dir``); the transformer sharded at ``max_shard_size`` when given."""
    pipe.save_pretrained(staging / "model", safe_serialization=True)
    # save_pretrained rewrites tokenizers as tokenizer.json; put back the files real FLUX folders carry
    for sub, trained in (("tokenizer", "clip"), ("tokenizer_2", "t5")):
        shutil.rmtree(staging / "model" / sub)
        shutil.copytree(tokenizer_dir / trained, staging / "model" / sub)
    if max_shard_size is not None:  # sharded, so the index path is the one the tiny model exercises
        shutil.rmtree(staging / "model" / "transformer")
        pipe.transformer.save_pretrained(staging / "model" / "transformer", max_shard_size=max_shard_size)
    return staging / "model"


def write_checkpoint(out: str | Path, make: Callable[[Path], Path]) -> Path:
    """``make(staging)`` writes a checkpoint folder somewhere inside the fresh folder ``staging`` and returns
    it; it becomes ``out`` (which must not exist or be empty) by one rename, so ``out`` is whole or absent."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"tiny-model output {out} already exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with quiet_hf():
            made = make(staging)
        if out.exists():
            out.rmdir()
        made.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def write_tiny_checkpoint(out: str | Path, variant: str = "dev", seed: int = 0, trained: bool = False) -> Path:
    """Write the tiny checkpoint to ``out`` (which must not exist or be empty), atomically: seeded random
    weights, or with ``trained`` the shipped trained model (``TRAINED``; dev only, no seed)."""
    if variant not in VARIANTS:
        raise CheckpointError(f"variant {variant!r} is not one of {VARIANTS}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise CheckpointError(f"seed must be an integer in [0, 2**63 - 1] (torch's generator), got {seed!r}")
    if trained:
        source = TRAINED / variant
        if not (source / "model_index.json").is_file():
            have = sorted(p.name for p in TRAINED.iterdir() if (p / "model_index.json").is_file()) if TRAINED.is_dir() else []
            raise CheckpointError(f"no trained tiny {variant} model ships with fluxrt (trained: {have}); "
                                  f"train one with fluxrt train-tiny")
        return write_checkpoint(out, lambda staging: Path(shutil.copytree(source, staging / "model")))

    def make(staging: Path) -> Path:
        pipe = build_pipeline(variant, seed, staging / "_tokenizers")
        return save_checkpoint(pipe, staging, staging / "_tokenizers", max_shard_size="200KB")

    return write_checkpoint(out, make)
