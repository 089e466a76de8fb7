"""The running batch: per-row state plus the tensors (KV cache, mask, positions) that shrink and merge between steps."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from common.schemas import (ErrorEvent, FinalEvent, FinishReason, GenerationJob, PrefillToken, Token,
                            TokenEvent)

from .detokenize import IncrementalDecoder
from .kvcache import SlotCache
from .paged.cache import PagedCache
from .sampling import SamplingBatch
from .stopping import StoppingCriteria


@dataclass
class Row:
    """One sequence's host-side state: ids so far, decoding/stopping state and the tokens it produced."""
    job: GenerationJob
    ids: list[int]  # prompt + generated
    prompt_len: int
    stopping: StoppingCriteria
    detok: IncrementalDecoder
    generator: torch.Generator | None
    started_at: float
    tokens: list[Token] = field(default_factory=list)
    prefill: tuple[PrefillToken, ...] = ()
    finish: FinishReason | None = None
    final_event: FinalEvent | None = None
    cancelled: bool = False
    constraint: Any = None  # the output constraint's matcher (worker.constraints), None when unconstrained
    error: ErrorEvent | None = None  # set when the row failed on its own (its constraint broke): it leaves

    @property
    def active(self) -> bool:
        """Still generating: neither finished, failed nor cancelled."""
        return self.finish is None and self.error is None and not self.cancelled

    @property
    def generated(self) -> list[int]:
        return self.ids[self.prompt_len:]

    def accept(self, token_id: int, logprob: float, special_ids: frozenset[int],
               decode_final: Callable[[list[int]], str], top: tuple[Token, ...] = ()) -> TokenEvent | FinalEvent:
        """Record one generated token (with its alternatives, if the job asked); returns its event (a
        FinalEvent when the row is done)."""
        self.ids.append(token_id)
        text = self.detok.step(self.ids)
        token = Token(id=token_id, text=text, logprob=logprob, special=token_id in special_ids, top=top)
        self.tokens.append(token)
        index = len(self.ids) - self.prompt_len - 1
        done, reason = self.stopping(token_id, text)
        job = self.job
        if not done or reason is None:
            return TokenEvent(request_id=job.request_id, attempt=job.attempt, index=index, token=token)
        self.finish = reason
        self.final_event = FinalEvent(
            request_id=job.request_id, attempt=job.attempt, index=index, token=token,
            generated_text=decode_final(self.generated), finish_reason=reason,
            generated_tokens=index + 1, seed=job.sampling.seed if job.sampling.sampling else None,
            started_at=self.started_at, finished_at=time.time(),
            tokens=tuple(self.tokens) if job.want_tokens else (), prefill=self.prefill)
        return self.final_event


@dataclass
class PrefillInputs:
    """Left-padded prompts ready for one forward."""
    input_ids: torch.Tensor  # [n, L]
    mask: torch.Tensor  # [n, L] bool, False on padding
    position_ids: torch.Tensor  # [n, L]
    attention: torch.Tensor  # [n, 1, L, L] bool


def prefill_inputs(prompts: Sequence[Sequence[int]], device: torch.device, pad_id: int = 0) -> PrefillInputs:
    """Left-pad prompts and build positions (cumsum(mask) - 1) and the causal+padding 4D mask."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, length - len(p):] = True
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones((length, length), dtype=torch.bool, device=device).tril()
    # Padding queries attend to themselves only, so no attention row is empty (no NaNs anywhere).
    eye = torch.eye(length, dtype=torch.bool, device=device)
    attention = (causal[None] & mask[:, None, :]) | eye[None]
    return PrefillInputs(ids, mask, positions, attention[:, None])


def build_seen(rows: Sequence[Row], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, V] bool: which ids each row's context holds (the repetition penalty's domain)."""
    seen = torch.zeros((len(rows), vocab_size), dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        seen[i, torch.tensor(row.ids, dtype=torch.long, device=device)] = True
    return seen


def build_counts(rows: Sequence[Row], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, V] float: how many times each row generated each id (OpenAI's penalties; the prompt does not count)."""
    return torch.stack([torch.bincount(torch.tensor(row.generated, dtype=torch.long), minlength=vocab_size)
                        for row in rows]).to(device=device, dtype=torch.float32)


def _kept(history: torch.Tensor | None, needed: bool, rows: int,
          build: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """A per-row history tensor after the rows changed: dropped when no row needs it, rebuilt when it
    does not cover the rows (a side of a merge had none)."""
    if not needed:
        return None
    if history is None or history.shape[0] != rows:
        return build()
    return history


def _merged(ours: torch.Tensor | None, theirs: torch.Tensor | None) -> torch.Tensor | None:
    return torch.cat([ours, theirs]) if ours is not None and theirs is not None else None


@dataclass
class Batch:
    """Rows decoded together. `filter` and `concatenate` mutate it in place and return None."""
    rows: list[Row]
    cache: SlotCache | PagedCache
    mask: torch.Tensor  # [B, T] bool over the cached columns
    next_pos: torch.Tensor  # [B] position of the token in `last_ids`
    last_ids: torch.Tensor  # [B] token to feed at the next decode step (not yet in the cache)
    vocab_size: int
    device: torch.device
    sampling: SamplingBatch = field(init=False)
    seen: torch.Tensor | None = None  # build_seen's, while a row has a repetition penalty
    counts: torch.Tensor | None = None  # build_counts', while a row has a frequency or presence penalty

    def __post_init__(self) -> None:
        self._refresh()

    def __len__(self) -> int:
        return len(self.rows)

    def _refresh(self) -> None:
        """Rebuild the per-row parameter tensors after the rows changed."""
        self.sampling = SamplingBatch.build([r.job.sampling for r in self.rows],
                                            [r.generator for r in self.rows], self.device)
        n = len(self.rows)
        self.seen = _kept(self.seen, self.sampling.needs_seen, n,
                          lambda: build_seen(self.rows, self.vocab_size, self.device))
        self.counts = _kept(self.counts, self.sampling.needs_counts, n,
                            lambda: build_counts(self.rows, self.vocab_size, self.device))

    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Extend the mask by the incoming column; returns input_ids [B,1], 4D mask, position_ids [B,1]."""
        ones = torch.ones((len(self.rows), 1), dtype=torch.bool, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self.last_ids[:, None], self.mask[:, None, None, :], self.next_pos[:, None]

    def advance(self, next_ids: torch.Tensor) -> None:
        """The decode step consumed `last_ids`; the freshly chosen ids are fed next."""
        self.last_ids = next_ids
        self.next_pos = self.next_pos + 1
        self.note_seen(next_ids)

    def note_seen(self, ids: torch.Tensor) -> None:
        """Each row generated ids[row]: the penalties' history learns it."""
        rows = torch.arange(len(self.rows), device=self.device)
        if self.seen is not None:
            self.seen[rows, ids] = True
        if self.counts is not None:
            self.counts[rows, ids] += 1

    def filter(self, keep: Sequence[int]) -> None:
        """Keep only rows `keep` (order not preserved) and drop padding columns no remaining row needs."""
        n, kept = len(self.rows), set(keep)
        if len(kept) == n:
            return
        # Departed rows' slots below the new size are refilled from the tail: only those rows move.
        size = len(kept)
        holes = [i for i in range(size) if i not in kept]
        movers = [i for i in range(size, n) if i in kept]
        order = list(range(size))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        index = torch.tensor(order, dtype=torch.long, device=self.device)
        mask = self.mask[index]
        used = mask.any(dim=0)
        drop = int(used.long().argmax()) if bool(used.any()) else mask.shape[1]
        self.cache.retire({i: self.rows[i].ids for i in range(n) if i not in kept})
        self.cache.compact(holes, movers, size, drop)
        self.mask = mask[:, drop:]
        self.next_pos = self.next_pos[index]
        self.last_ids = self.last_ids[index]
        if self.seen is not None:
            self.seen = self.seen[index]
        if self.counts is not None:
            self.counts = self.counts[index]
        self.rows = [self.rows[i] for i in order]
        self._refresh()

    def close(self) -> None:
        """Every row left: what outlives them stays in the cache (PagedCache.retire), the rest is freed."""
        self.cache.retire(dict(enumerate(r.ids for r in self.rows)))
        self.cache.release()

    def concatenate(self, other: Batch) -> None:
        """Append `other`'s rows (e.g. just prefilled), left-padding the shorter side's columns."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        self.cache.absorb(other.cache)
        self.mask = torch.cat([_left_pad(self.mask, length), _left_pad(other.mask, length)], dim=0)
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.last_ids = torch.cat([self.last_ids, other.last_ids])
        self.seen = _merged(self.seen, other.seen)
        self.counts = _merged(self.counts, other.counts)
        self.rows = self.rows + other.rows
        self._refresh()


def _left_pad(mask: torch.Tensor, length: int) -> torch.Tensor:
    if mask.shape[1] == length:
        return mask
    pad = torch.zeros((mask.shape[0], length - mask.shape[1]), dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=1)


def new_rows(jobs: Sequence[GenerationJob], eos_token_id: int | None, decode: Callable[[Sequence[int]], str],
             make_generator: Callable[[int], torch.Generator], started_at: float) -> list[Row]:
    """Fresh host-side state for jobs about to be prefilled."""
    rows = []
    for job in jobs:
        ids = list(job.input_ids)
        rows.append(Row(job=job, ids=ids, prompt_len=len(ids),
                        stopping=StoppingCriteria(eos_token_id, job.stopping.max_new_tokens, job.stopping.stop),
                        detok=IncrementalDecoder(decode, len(ids)),
                        generator=make_generator(job.sampling.seed) if job.sampling.sampling else None,
                        started_at=started_at))
    return rows
