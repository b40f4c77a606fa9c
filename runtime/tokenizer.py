"""Prompt tokenization for CLIP and T5 from the export folder's ``tokenizer.json`` files.

Ids equal transformers' tokenizers called the way diffusers' FluxPipeline calls them
(``padding="max_length", truncation=True``).  Truncation is never silent: a prompt longer
than the limit raises a :class:`PromptTruncatedWarning` saying how many tokens were dropped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fluxrt.errors import ExportError, InvalidInputError

KINDS = ("clip", "t5")


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the encoder takes; the rest was dropped."""


@dataclass
class PromptTokenizer:
    kind: str  # "clip" or "t5"
    tokenizer: object  # tokenizers.Tokenizer
    pad_id: int

    @classmethod
    def from_file(cls, path: str | Path, kind: str) -> "PromptTokenizer":
        from tokenizers import Tokenizer

        if kind not in KINDS:
            raise ValueError(f"tokenizer kind {kind!r} is not one of {KINDS}")
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"{kind} tokenizer file {path} is missing")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise ExportError(f"{kind} tokenizer file {path} is not a readable tokenizers JSON ({e})") from None
        pad = "<|endoftext|>" if kind == "clip" else "<pad>"
        pad_id = tok.token_to_id(pad)
        if pad_id is None:
            raise ExportError(f"{kind} tokenizer file {path} has no padding token {pad!r}")
        tok.no_padding()
        tok.no_truncation()
        return cls(kind, tok, pad_id)

    def encode(self, prompts: list[str], max_length: int) -> np.ndarray:
        """int32 ids [len(prompts), max_length], padded and truncated like transformers."""
        if max_length < 2:
            raise InvalidInputError(f"{self.kind} max_length must be at least 2 (room for the special tokens), "
                                    f"got {max_length}")
        out = np.full((len(prompts), max_length), self.pad_id, dtype=np.int32)
        for row, encoding in enumerate(self.tokenizer.encode_batch(list(prompts))):
            ids = encoding.ids
            if len(ids) > max_length:
                dropped = len(ids) - max_length
                warnings.warn(f"{self.kind} prompt {row} has {len(ids)} tokens; the limit is {max_length}, so the "
                              f"last {dropped} were dropped", PromptTruncatedWarning, stacklevel=2)
                # content is cut, the closing special token (CLIP's and T5's end of text) is kept
                ids = ids[: max_length - 1] + ids[-1:]
            out[row, : len(ids)] = ids
        return out
