"""Output constraints in the worker: each constrained row's matcher and its allowed-token mask.

A job's constraint arrives as an llguidance grammar (the API turned the request's JSON schema, regex,
Lark grammar or choice list into one, `common/grammars.py`). `Grammars` compiles each distinct grammar
once into a matcher (a bounded LRU) and hands every row its own copy, so no grammar is compiled per
row or per token. Each step, `Masks.fill` fills one bitmask for all constrained rows at once
(llguidance's executor runs them in parallel threads without the GIL), `Masks.bias` turns it into the
logits' additive mask, and `consume` advances each row's matcher by the token it chose. A matcher that ends complete allows only EOS, so a constrained row ends there
(`eos_token`) unless its length limit comes first.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import llguidance
import llguidance.hf
import torch
from llguidance import LLExecutor, LLMatcher
from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask_par

from common.grammars import parser_limits

# byte -> its 8 ids' additive mask (0 allowed, -inf not), bit k of byte b being id 8b + k
_BYTE_BIAS = [[0.0 if (b >> k) & 1 else float("-inf") for k in range(8)] for b in range(256)]


class GrammarError(ValueError):
    """A grammar the worker cannot compile or follow: the job fails with this message."""


class Grammars:
    """Compiled grammars by their text (LRU of `capacity`), for one tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_id: int | None, capacity: int = 64) -> None:
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.capacity = capacity
        self._tokenizer: llguidance.LLTokenizer | None = None  # built at the first constrained job (~0.4 s)
        self._compiled: OrderedDict[str, LLMatcher] = OrderedDict()
        self.compilations = 0  # grammars compiled so far (the LRU's misses)

    def _llt(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size,
                                                           eos_token=self.eos_token_id)
        return self._tokenizer

    def matcher(self, grammar: str) -> LLMatcher:
        """A fresh matcher for `grammar` at its start; GrammarError if it does not compile. The engine's
        thread alone calls it."""
        compiled = self._compiled.get(grammar)
        if compiled is None:
            compiled = LLMatcher(self._llt(), grammar, log_level=0, limits=parser_limits())
            self.compilations += 1
            if compiled.is_error():
                raise GrammarError(f"invalid grammar: {compiled.get_error()}")
            self._compiled[grammar] = compiled
            while len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(grammar)
        return compiled.deep_copy()


class Masks:
    """Fills the allowed-token masks of a step's constrained rows (one executor for the worker's life)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._executor = LLExecutor()
        self._bitmask = allocate_token_bitmask(1, vocab_size)  # grown to the most rows seen, reused
        self._tables: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def fill(self, matchers: Sequence[LLMatcher]) -> torch.Tensor:
        """The matchers' next allowed ids as llguidance's bitmask [n, ceil(V / 32)] int32 (bit k of word w:
        id 32w + k), computed in llguidance's threads without the GIL."""
        n = len(matchers)
        if self._bitmask.shape[0] < n:
            self._bitmask = allocate_token_bitmask(n, self.vocab_size)
        bitmask = self._bitmask[:n]
        fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        return bitmask

    def bias(self, bitmask: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[n, V] of `dtype`: 0 where the bitmask allows the id, -inf where it does not.

        An additive mask, looked up a byte of the bitmask at a time: on a CPU a lookup and an add cost a
        third of what a boolean masked_fill of the same size does."""
        table = self._tables.get((dtype, device))
        if table is None:
            table = self._tables[(dtype, device)] = torch.tensor(_BYTE_BIAS, dtype=dtype, device=device)
        packed = bitmask.view(torch.uint8).to(device, torch.int32)  # little-endian: byte k holds ids 8k..8k+7
        return table[packed].reshape(bitmask.shape[0], -1)[:, :self.vocab_size]


def consume(matchers: Sequence[LLMatcher], ids: Sequence[int]) -> list[str | None]:
    """Advance each matcher by its row's chosen id; per row None, or why the matcher refused it."""
    errors: list[str | None] = []
    for matcher, token in zip(matchers, ids):
        if matcher.is_stopped():  # complete: the row's EOS ends it, nothing left to follow
            errors.append(None)
        elif matcher.consume_token(token):
            errors.append(None)
        else:
            errors.append(f"the output constraint failed: {matcher.get_error() or 'token refused'}")
    return errors
