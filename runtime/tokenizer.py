"""Prompt tokenization for CLIP and T5 from the export folder's ``tokenizer.json`` files.

Ids equal those of transformers' tokenizers called the way diffusers' ``FluxPipeline`` calls
them (``padding="max_length", max_length=..., truncation=True``, special tokens added): CLIP gets
``<|startoftext|> ... <|endoftext|>`` padded with ``<|endoftext|>``, T5 gets ``... </s>`` padded
with ``<pad>``.  Padding and truncation are done here, whatever the JSON file says about them.
Truncation is never silent: it raises a :class:`PromptTruncatedWarning` with the count dropped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fluxrt.errors import ExportError, InvalidInputError

PAD_TOKENS = {"clip": "<|endoftext|>", "t5": "<pad>"}  # what FLUX's tokenizer/ and tokenizer_2/ pad with
ENCODER_NAMES = {"clip": "CLIP", "t5": "T5"}


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the encoder takes; the rest was dropped."""


@dataclass(frozen=True)
class PromptTokenizer:
    kind: str  # "clip" or "t5"
    tokenizer: object  # tokenizers.Tokenizer, with padding and truncation off
    pad_id: int

    @classmethod
    def from_file(cls, path: str | Path, kind: str) -> "PromptTokenizer":
        """Load a tokenizers-library JSON file written by ``fluxrt export``."""
        from tokenizers import Tokenizer

        if kind not in PAD_TOKENS:
            raise ValueError(f"tokenizer kind {kind!r} is not one of {list(PAD_TOKENS)}")
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"{kind} tokenizer file {path} is missing")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise ExportError(f"{kind} tokenizer file {path} is not a readable tokenizers JSON ({e})") from None
        pad_id = tok.token_to_id(PAD_TOKENS[kind])
        if pad_id is None:
            raise ExportError(f"{kind} tokenizer file {path} has no padding token {PAD_TOKENS[kind]!r}")
        tok.no_padding()
        tok.no_truncation()
        return cls(kind, tok, pad_id)

    def encode(self, prompts: list[str], max_length: int) -> np.ndarray:
        """int32 ids [len(prompts), max_length], truncated and padded like transformers."""
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
            raise InvalidInputError(f"{self.kind} max_length must be an integer of at least 2 (room for the "
                                    f"special tokens), got {max_length!r}")
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise InvalidInputError(f"prompts must be a list of strings, got {prompts!r}")
        out = np.full((len(prompts), max_length), self.pad_id, dtype=np.int32)  # [B, max_length]
        for row, encoding in enumerate(self.tokenizer.encode_batch(list(prompts))):
            out[row, :min(len(encoding.ids), max_length)] = self.truncate(encoding, max_length, row)
        return out

    def truncate(self, encoding, max_length: int, row: int) -> list[int]:
        """The ids of one encoding cut to ``max_length`` the way tokenizers' truncation cuts them:
        content tokens are dropped from the end, the special tokens around them are kept."""
        ids = encoding.ids
        if len(ids) <= max_length:
            return ids
        dropped = len(ids) - max_length
        warnings.warn(f"{ENCODER_NAMES[self.kind]} prompt {row} has {len(ids)} tokens but the encoder takes "
                      f"{max_length}: the last {dropped} tokens before the end-of-text token were dropped",
                      PromptTruncatedWarning, stacklevel=3)
        keep = [i for i, special in enumerate(encoding.special_tokens_mask) if not special]
        cut = set(keep[len(keep) - dropped:])
        return [t for i, t in enumerate(ids) if i not in cut]
