"""Waiting queue and admission under TGI's token budgets (v0.7+/v0.9 knobs), strictly FIFO."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Generic, Hashable, TypeVar

from common.settings import LimitSettings, WorkerSettings

T = TypeVar("T")


@dataclass(frozen=True)
class Budget:
    """The admission knobs, with TGI's derived defaults resolved."""
    max_batch_size: int
    max_batch_total_tokens: int
    max_batch_prefill_tokens: int
    waiting_served_ratio: float
    max_waiting_tokens: int

    @classmethod
    def from_settings(cls, worker: WorkerSettings, limits: LimitSettings) -> Budget:
        total = worker.max_batch_total_tokens or worker.max_batch_size * limits.max_total_tokens
        return cls(max_batch_size=worker.max_batch_size, max_batch_total_tokens=total,
                   max_batch_prefill_tokens=worker.max_batch_prefill_tokens,
                   waiting_served_ratio=worker.waiting_served_ratio,
                   max_waiting_tokens=worker.max_waiting_tokens)


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A waiting request: its payload, id and token needs (prompt, and new tokens reserved for decode)."""
    key: Hashable
    item: T
    prompt_tokens: int
    max_new_tokens: int
    cached_tokens: int = 0  # prompt tokens a prefix cache holds already: not computed again

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def reserved(self) -> int:
        return self.prompt_tokens + self.max_new_tokens


class Scheduler(Generic[T]):
    """Decides which waiting entries join the running batch; knows nothing about models."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.waiting: deque[Entry[T]] = deque()
        self.running: dict[Hashable, int] = {}  # key -> reserved tokens
        self.steps_since_admit = 0  # TGI's `waiting_tokens`

    @property
    def running_tokens(self) -> int:
        return sum(self.running.values())

    def room(self) -> int:
        """How many more requests may be pulled into the local waiting list (never more than fit a batch)."""
        return max(0, self.budget.max_batch_size - len(self.running) - len(self.waiting))

    def add(self, entry: Entry[T]) -> None:
        self.waiting.append(entry)

    def remove_waiting(self, keys: set[Hashable]) -> list[Entry[T]]:
        """Drop waiting entries by key (cancelled), returning them."""
        gone = [e for e in self.waiting if e.key in keys]
        if gone:
            self.waiting = deque(e for e in self.waiting if e.key not in keys)
        return gone

    def take_waiting(self) -> list[Entry[T]]:
        """Empty the waiting list (shutdown: give the jobs back)."""
        out = list(self.waiting)
        self.waiting.clear()
        return out

    def release(self, key: Hashable) -> None:
        """A running request left the batch; its tokens return to the budget."""
        self.running.pop(key, None)

    def on_step(self) -> None:
        """One decode step ran without admitting anything."""
        self.steps_since_admit += 1

    def admit(self) -> list[Entry[T]]:
        """Pop the entries to prefill now (possibly none), in FIFO order, and count them as running."""
        if not self.waiting:
            return []
        b = self.budget
        running = len(self.running)
        max_size = b.max_batch_size - running
        if max_size <= 0:
            return []
        min_size = 0
        if running and self.steps_since_admit < b.max_waiting_tokens:
            # While a batch runs, pausing it for a prefill is only worth it for enough newcomers.
            # Capped at the free slots: the local waiting list never holds more than those.
            min_size = min(math.floor(running * b.waiting_served_ratio), max_size)
        token_budget = b.max_batch_total_tokens - self.running_tokens
        chosen = self._select(max_size, token_budget, alone_ok=not running)
        if not chosen or len(chosen) < min_size:
            return []
        for _ in chosen:
            self.waiting.popleft()
        for e in chosen:
            self.running[e.key] = e.reserved
        self.steps_since_admit = 0
        return chosen

    def _select(self, max_size: int, token_budget: int, alone_ok: bool) -> list[Entry[T]]:
        """The longest FIFO prefix that fits the budgets; an oversized head goes alone rather than wedging."""
        chosen: list[Entry[T]] = []
        prefill = 0
        total = 0
        for e in self.waiting:
            if len(chosen) >= max_size:
                break
            fits_prefill = prefill + e.prefill_tokens <= self.budget.max_batch_prefill_tokens
            fits_total = total + e.reserved <= token_budget
            if fits_prefill and fits_total:
                chosen.append(e)
                prefill += e.prefill_tokens
                total += e.reserved
                continue
            if not chosen and (alone_ok or (fits_total and e.prefill_tokens > self.budget.max_batch_prefill_tokens)):
                # A head that can never fit the prefill budget (or, on an idle worker, the total
                # budget) is prefilled on its own; otherwise strict FIFO waits for room.
                chosen.append(e)
            break
        return chosen


def prefill_groups(lengths: list[int], max_waste: float = 0.25) -> list[list[int]]:
    """Split one admission into forwards of similar prompt lengths (indices into `lengths`).

    A padded prefill costs rows x longest prompt; on CPU that is compute, so a group only grows
    while its padding stays under `max_waste` of its real tokens.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        n = lengths[i]  # ascending: the newcomer is the group's longest
        if current and (len(current) + 1) * n > (1 + max_waste) * (real + n):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += n
    if current:
        groups.append(current)
    return groups
