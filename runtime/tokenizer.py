"""Prompt tokenization for CLIP and T5 from the export folder's ``tokenizer.json`` files.

Ids equal those of transformers' tokenizers called the way diffusers' ``FluxPipeline`` calls
them (``padding="max_length", max_length=..., truncation=True``, special tokens added): CLIP gets
``<|startoftext|> ... <|endoftext|>`` padded with ``<|endoftext|>``, T5 gets ``... </s>`` padded
with ``<pad>``.  Padding and truncation are done here, whatever the JSON file says about them.
Truncation is never silent: it warns with a :class:`PromptTruncatedWarning` giving the count dropped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from fluxrt.components import PAD_TOKENS
from fluxrt.errors import ExportError, InvalidInputError

ENCODER_NAMES = {"clip": "CLIP", "t5": "T5"}


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the encoder takes; the rest was dropped."""


@dataclass(frozen=True)
class PromptTokenizer:
    kind: str  # "clip" or "t5"
    tokenizer: Tokenizer  # padding and truncation off
    pad_id: int
    leading: int  # special tokens the post-processor puts before the prompt's tokens (CLIP 1, T5 0)
    trailing: int  # and after them (CLIP and T5: 1, the end-of-text token)

    @classmethod
    def from_file(cls, path: str | Path, kind: str) -> "PromptTokenizer":
        """Load a tokenizers-library JSON file written by ``fluxrt export``."""
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
        tok.encode_special_tokens = False  # special tokens written in a prompt are matched, as transformers does
        mask = tok.encode("a").special_tokens_mask  # the post-processor's template around one word
        if all(mask):
            raise ExportError(f"{kind} tokenizer file {path} encodes the word 'a' to special tokens only")
        return cls(kind, tok, pad_id, leading=mask.index(0), trailing=mask[::-1].index(0))

    def encode(self, prompts: list[str], max_length: int) -> np.ndarray:
        """int32 ids [len(prompts), max_length], truncated and padded like transformers."""
        least = max(self.leading + self.trailing, 1)
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < least:
            raise InvalidInputError(f"{self.kind} max_length must be an integer of at least {least} (room for the "
                                    f"special tokens), got {max_length!r}")
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise InvalidInputError(f"prompts must be a list of strings, got {prompts!r}")
        out = np.full((len(prompts), max_length), self.pad_id, dtype=np.int32)  # [B, max_length]
        for row, encoding in enumerate(self.tokenizer.encode_batch(list(prompts))):
            ids = self.truncate(encoding.ids, max_length, row)
            out[row, :len(ids)] = ids
        return out

    def truncate(self, ids: list[int], max_length: int, row: int) -> list[int]:
        """``ids`` cut to ``max_length`` as tokenizers' truncation cuts them (transformers' ``truncation=True``):
        the prompt's last tokens are dropped, the special tokens around them kept."""
        if len(ids) <= max_length:
            return ids
        dropped = len(ids) - max_length
        warnings.warn(f"{self.kind} prompt {row} has {len(ids)} tokens; the limit is {max_length}, so the last "
                      f"{dropped} were dropped (the {ENCODER_NAMES[self.kind]} encoder reads {max_length} tokens, "
                      f"end-of-text included)", PromptTruncatedWarning, stacklevel=3)
        end = len(ids) - self.trailing
        return ids[:end - dropped] + ids[end:]
