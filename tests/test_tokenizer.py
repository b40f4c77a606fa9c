"""The runtime's tokenizer against transformers' CLIPTokenizer / T5TokenizerFast, called the way
diffusers' FluxPipeline calls them, on the tiny trained tokenizers."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from fluxrt.errors import CheckpointError, ExportError, InvalidInputError
from fluxrt.export.tokenizers_tiny import VOCAB_SIZE, corpus, write_runtime_tokenizer, write_tiny_tokenizers
from fluxrt.runtime.tokenizer import PromptTokenizer, PromptTruncatedWarning

PROMPTS = [
    "",
    "cat",
    "Hello, world!!! ... ?!? (really) [yes] {no} -- a/b & c; d: e",
    "an astronaut riding a horse on the moon, digital art",
    "Ünïcödé façade — naïve café, crème brûlée, Ångström",
    "東京タワーの夜景 and 北京烤鸭 with 한국어",
    "emoji 🙂🚀👩‍👩‍👧 and ✨ sparkles ✨",
    "  tabs\tand\n\nnewlines   and    spaces  \r\n",
    "\t\t\n",
    "UPPER lower MiXeD CaSe WORDS",
    "don't stop; it's 3.14159 o'clock & 50% off!!! 1,000,000 or 007",
    "prompt with <|endoftext|> and </s> written in it",
    " ".join(["a lighthouse on a cliff at dawn, oil painting"] * 12),  # > 77 CLIP tokens, < 256 T5 tokens
    " ".join(["portrait of an old fisherman, 35mm film photo"] * 60),  # > 512 tokens for both
]
LENGTHS = [("clip", 77), ("clip", 16), ("t5", 512), ("t5", 256), ("t5", 16)]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict:
    """kind -> (ours, transformers'), from the tiny tokenizers written and converted as the exporter does."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    root = tmp_path_factory.mktemp("tokenizers")
    write_tiny_tokenizers(root / "tokenizer", root / "tokenizer_2", seed=0)
    write_runtime_tokenizer(root / "tokenizer", root / "clip.json", "clip")
    write_runtime_tokenizer(root / "tokenizer_2", root / "t5.json", "t5")
    return {
        "root": root,
        "clip": (PromptTokenizer.from_file(root / "clip.json", "clip"),
                 CLIPTokenizer.from_pretrained(root / "tokenizer")),
        "t5": (PromptTokenizer.from_file(root / "t5.json", "t5"),
               T5TokenizerFast.from_pretrained(root / "tokenizer_2")),
    }


def transformers_ids(tokenizer, prompts: list[str], max_length: int) -> np.ndarray:
    """As FluxPipeline._get_clip_prompt_embeds / _get_t5_prompt_embeds tokenize."""
    out = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_length=False, return_overflowing_tokens=False, add_special_tokens=True, return_tensors="np")
    return out.input_ids


def encode_quietly(ours: PromptTokenizer, prompts: list[str], max_length: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        return ours.encode(prompts, max_length)


def test_folders_look_like_flux(tokenizers):
    root = tokenizers["root"]
    assert sorted(p.name for p in (root / "tokenizer").iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert sorted(p.name for p in (root / "tokenizer_2").iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    clip, t5 = tokenizers["clip"][1], tokenizers["t5"][1]
    assert len(clip) == VOCAB_SIZE and clip.model_max_length == 77
    assert clip.convert_ids_to_tokens([clip.bos_token_id, clip.eos_token_id, clip.pad_token_id]) == [
        "<|startoftext|>", "<|endoftext|>", "<|endoftext|>"]
    assert json.loads((root / "tokenizer" / "vocab.json").read_text())["a</w>"] < 512  # bytes and bytes</w> first
    assert 500 < len(t5) <= VOCAB_SIZE and t5.model_max_length == 512
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert t5("a cat").input_ids[-1] == 1


def test_training_is_deterministic(tmp_path):
    write_tiny_tokenizers(tmp_path / "a" / "clip", tmp_path / "a" / "t5", seed=3)
    write_tiny_tokenizers(tmp_path / "b" / "clip", tmp_path / "b" / "t5", seed=3)
    for sub, name in (("clip", "merges.txt"), ("clip", "vocab.json"), ("t5", "tokenizer.json")):
        assert (tmp_path / "a" / sub / name).read_bytes() == (tmp_path / "b" / sub / name).read_bytes()
    assert corpus(0) != corpus(1) and sorted(corpus(0)) == sorted(corpus(1))


@pytest.mark.parametrize("kind,max_length", LENGTHS)
def test_ids_equal_transformers(tokenizers, kind, max_length):
    ours, theirs = tokenizers[kind]
    for prompt in PROMPTS:
        got = encode_quietly(ours, [prompt], max_length)
        assert got.dtype == np.int32 and got.shape == (1, max_length)
        np.testing.assert_array_equal(got, transformers_ids(theirs, [prompt], max_length), err_msg=repr(prompt))
    np.testing.assert_array_equal(encode_quietly(ours, PROMPTS, max_length),
                                  transformers_ids(theirs, PROMPTS, max_length))


@pytest.mark.parametrize("kind,max_length", LENGTHS)
def test_truncation_warns_with_the_dropped_count(tokenizers, kind, max_length):
    ours, theirs = tokenizers[kind]
    for prompt in PROMPTS:
        full = len(theirs(prompt).input_ids)  # untruncated, special tokens included
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours.encode(["short", prompt], max_length)
        truncated = [w for w in caught if issubclass(w.category, PromptTruncatedWarning)]
        if full <= max_length:
            assert not truncated, repr(prompt)
            continue
        assert len(truncated) == 1, repr(prompt)
        message = str(truncated[0].message)
        assert message == (f"{kind} prompt 1 has {full} tokens; the limit is {max_length}, so the last "
                           f"{full - max_length} were dropped (the {kind.upper()} encoder reads {max_length} tokens, "
                           f"end-of-text included)")
        assert truncated[0].filename == __file__  # points at the caller of encode()


def test_long_prompts_are_long_enough(tokenizers):
    """The prompt list really exercises truncation at every tested length."""
    for kind, max_length in LENGTHS:
        theirs = tokenizers[kind][1]
        assert any(len(theirs(p).input_ids) > max_length for p in PROMPTS), (kind, max_length)
    assert len(tokenizers["clip"][1](PROMPTS[-2]).input_ids) > 77
    assert len(tokenizers["t5"][1](PROMPTS[-2]).input_ids) < 256


def test_pad_and_truncation_saved_in_the_json_are_ignored(tokenizers, tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizers["root"] / "t5.json"))
    tok.enable_padding(pad_id=2, pad_token="<unk>", length=40)
    tok.enable_truncation(8)
    tok.save(str(tmp_path / "t5.json"))
    ours = PromptTokenizer.from_file(tmp_path / "t5.json", "t5")
    np.testing.assert_array_equal(encode_quietly(ours, PROMPTS, 64), transformers_ids(tokenizers["t5"][1], PROMPTS, 64))


def test_t5_from_sentencepiece_model(tmp_path):
    """A real FLUX tokenizer_2/ may come with spiece.model only; transformers converts it."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import T5TokenizerFast

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus(0)), model_writer=model, vocab_size=400,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
                                   eos_piece="</s>", unk_piece="<unk>", minloglevel=2)
    (tmp_path / "tokenizer_2").mkdir()
    (tmp_path / "tokenizer_2" / "spiece.model").write_bytes(model.getvalue())
    write_runtime_tokenizer(tmp_path / "tokenizer_2", tmp_path / "t5.json", "t5")
    ours = PromptTokenizer.from_file(tmp_path / "t5.json", "t5")
    theirs = T5TokenizerFast.from_pretrained(tmp_path / "tokenizer_2")
    for max_length in (16, 512):
        np.testing.assert_array_equal(encode_quietly(ours, PROMPTS, max_length),
                                      transformers_ids(theirs, PROMPTS, max_length))


def test_runtime_file_is_written_atomically(tokenizers, tmp_path):
    root = tokenizers["root"]
    (tmp_path / "clip.json").write_text("old")
    write_runtime_tokenizer(root / "tokenizer", tmp_path / "clip.json", "clip")
    assert [p.name for p in tmp_path.iterdir()] == ["clip.json"]
    assert json.loads((tmp_path / "clip.json").read_text())["model"]["type"] == "BPE"


def test_runtime_file_errors(tokenizers, tmp_path):
    with pytest.raises(CheckpointError, match=f"t5 tokenizer folder {re.escape(str(tmp_path / 'absent'))} is missing"):
        write_runtime_tokenizer(tmp_path / "absent", tmp_path / "t5.json", "t5")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vocab.json").write_text("{not json")
    (broken / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(CheckpointError, match=rf"clip tokenizer in {re.escape(str(broken))} could not be loaded "
                                              r"\(files: \['merges.txt', 'vocab.json'\]\)"):
        write_runtime_tokenizer(broken, tmp_path / "clip.json", "clip")
    with pytest.raises(ValueError, match="tokenizer kind 'bert' is not one of"):
        write_runtime_tokenizer(tokenizers["root"] / "tokenizer", tmp_path / "x.json", "bert")
    assert not (tmp_path / "clip.json").exists() and not (tmp_path / "x.json").exists()


def test_tokenizer_file_errors(tokenizers, tmp_path):
    missing = tmp_path / "absent.json"
    with pytest.raises(ExportError, match=f"t5 tokenizer file {re.escape(str(missing))} is missing"):
        PromptTokenizer.from_file(missing, "t5")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"version": "1.0", "model": ')
    with pytest.raises(ExportError, match=f"clip tokenizer file {re.escape(str(corrupt))} is not a readable "
                                          f"tokenizers JSON"):
        PromptTokenizer.from_file(corrupt, "clip")
    # a T5 file read as CLIP: a readable tokenizer without CLIP's padding token
    t5_file = tokenizers["root"] / "t5.json"
    with pytest.raises(ExportError, match=rf"clip tokenizer file {re.escape(str(t5_file))} has no padding token "
                                          r"'<\|endoftext\|>'"):
        PromptTokenizer.from_file(t5_file, "clip")
    with pytest.raises(ValueError, match="tokenizer kind 'bert' is not one of"):
        PromptTokenizer.from_file(t5_file, "bert")


def test_encode_argument_errors(tokenizers):
    clip, t5 = tokenizers["clip"][0], tokenizers["t5"][0]
    with pytest.raises(InvalidInputError, match="clip max_length must be an integer of at least 2 .*, got 1"):
        clip.encode(["a"], 1)
    with pytest.raises(InvalidInputError, match="t5 max_length must be an integer of at least 1 .*, got 0"):
        t5.encode(["a"], 0)
    with pytest.raises(InvalidInputError, match="prompts must be a list of strings, got 'a cat'"):
        t5.encode("a cat", 16)
    with pytest.warns(PromptTruncatedWarning, match="t5 prompt 0 has 4 tokens; the limit is 1, so the last 3"):
        assert t5.encode(["a cat"], 1).tolist() == [[1]]  # transformers keeps only </s> too


@pytest.mark.parametrize("module", ["fluxrt.runtime.tokenizer", "fluxrt.runtime.sampling"])
def test_imports_without_torch(module):
    code = f"import sys; sys.modules['torch'] = None; import {module}; assert 'torch' not in [m.split('.')[0] " \
           f"for m, v in sys.modules.items() if v is not None]"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr
