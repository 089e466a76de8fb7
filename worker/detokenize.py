"""Streaming-safe incremental decoding (TGI v0.7+ prefix/read offsets, §9.7): never splits a character."""
from __future__ import annotations

from typing import Any, Callable, Sequence

REPLACEMENT = "\ufffd"
# A character is at most 4 bytes; an id run this long that still decodes to U+FFFD is not going to
# complete, so it is flushed (as U+FFFD, like a full decode) instead of widening the window forever.
MAX_PENDING = 8


def make_decoder(tokenizer: Any) -> Callable[[Sequence[int]], str]:
    """A cheap decode(ids) with skip_special_tokens=False, equal to tokenizer.decode's result."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        # The Rust decoder directly: no Python-side cleanup would change its output.
        return lambda ids: backend.decode(list(ids), skip_special_tokens=False)
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False)


class IncrementalDecoder:
    """Per-sequence offsets into the full id list (prompt + generated); decodes only a small window."""

    def __init__(self, decode: Callable[[Sequence[int]], str], prompt_len: int) -> None:
        self._decode = decode
        # Start a few prompt ids back so tokenizers that add a space depending on the left
        # neighbour render the first generated token as a full decode would.
        self.prefix_offset = max(0, prompt_len - 5)
        self.read_offset = prompt_len

    def step(self, ids: Sequence[int]) -> str:
        """Text added by the last id of `ids` ("" while a multi-byte character is incomplete)."""
        prefix_text = self._decode(ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(ids[self.prefix_offset:])
        pending = len(ids) - self.read_offset
        complete = len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT)
        if complete or (pending >= MAX_PENDING and len(new_text) > len(prefix_text)):
            self.prefix_offset = self.read_offset
            self.read_offset = len(ids)
            return new_text[len(prefix_text):]
        return ""
