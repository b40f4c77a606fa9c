"""Tokenizer files: the tiny checkpoint's trained tokenizers, and the conversion of any
checkpoint's tokenizers into the single ``tokenizer.json`` the runtime reads.

The tiny CLIP tokenizer is a byte-level BPE with CLIP's normalisation and ``</w>`` word ends,
the tiny T5 tokenizer a Unigram model with ``<pad>``=0, ``</s>``=1, ``<unk>``=2; both are trained
with the ``tokenizers`` library on a built-in corpus and saved through transformers, in the files
real FLUX folders carry (CLIP: vocab.json + merges.txt; T5: tokenizer.json).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from fluxrt.errors import CheckpointError

SUBJECTS = ["a red fox", "an astronaut", "a lighthouse", "an old fisherman", "a glass teapot", "two cats",
            "a mountain village", "a vintage car", "a robot chef", "a field of sunflowers", "a paper boat",
            "a koi pond", "a steam locomotive", "a wooden cabin", "a jellyfish", "a violin"]
SCENES = ["in the snow", "on the moon", "at dawn", "under neon lights", "in a rainy street", "on a cliff",
          "inside a cathedral", "beside a river", "in a desert at noon", "in a misty forest"]
STYLES = ["oil painting", "35mm film photo", "watercolor", "digital art, highly detailed", "pencil sketch",
          "studio lighting, 8k", "isometric 3d render", "ukiyo-e woodblock print", "cinematic, wide angle"]


def corpus(seed: int, n: int = 400) -> list[str]:
    rng = random.Random(seed)
    lines = [f"{rng.choice(SUBJECTS)} {rng.choice(SCENES)}, {rng.choice(STYLES)}" for _ in range(n)]
    lines += ["The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}-_/&%$#@*+=<>",
              "Don't, can't, we'll, I'm, you're, it's, they've, he'd"]
    return lines


def train_clip(seed: int, vocab_size: int = 1000) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(corpus(seed), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # like CLIP's: every byte symbol alone and at a word's end, then the merges, then the specials
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab: dict[str, int] = {}
    for t in tokens + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def train_t5(seed: int, vocab_size: int = 1000) -> list[tuple[str, float]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(corpus(seed + 1), trainer)
    return [(piece, float(score)) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]


def write_tiny_tokenizers(clip_dir: Path, t5_dir: Path, seed: int = 0) -> None:
    from transformers import CLIPTokenizer, T5TokenizerFast

    vocab, merges = train_clip(seed)
    clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    clip.save_pretrained(clip_dir)
    # real FLUX tokenizer/ folders hold vocab.json + merges.txt, not tokenizer.json
    (Path(clip_dir) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (Path(clip_dir) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (Path(clip_dir) / "tokenizer.json").unlink(missing_ok=True)
    t5 = T5TokenizerFast(vocab=train_t5(seed), extra_ids=0, model_max_length=512)
    t5.save_pretrained(t5_dir)


def load_checkpoint_tokenizer(src_dir: Path, kind: str):
    """The tokenizer diffusers' FluxPipeline would use for this folder."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    cls = {"clip": CLIPTokenizer, "t5": T5TokenizerFast}.get(kind)
    if cls is None:
        raise ValueError(f"tokenizer kind {kind!r} is not 'clip' or 't5'")
    if not Path(src_dir).is_dir():
        raise CheckpointError(f"{kind} tokenizer folder {src_dir} is missing")
    try:
        return cls.from_pretrained(str(src_dir), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError, Exception) as e:
        files = sorted(p.name for p in Path(src_dir).iterdir())
        raise CheckpointError(f"{kind} tokenizer in {src_dir} could not be loaded (files: {files}): {e}") from None


def write_runtime_tokenizer(src_dir: Path, dst_file: Path, kind: str) -> None:
    """Write the tokenizers-library JSON of the checkpoint's tokenizer, atomically."""
    tokenizer = load_checkpoint_tokenizer(src_dir, kind)
    dst_file = Path(dst_file)
    tmp = dst_file.with_name(f".{dst_file.name}.tmp-{os.getpid()}")
    tokenizer.backend_tokenizer.save(str(tmp))
    os.replace(tmp, dst_file)
