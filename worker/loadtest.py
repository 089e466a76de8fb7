"""LOAD TESTING ONLY: a worker loop with no model, for fleet simulations (`--load-test-tokens-per-s`).

`LoadTestLoop` speaks the engine's protocol (worker/engine.py: `RequestSource` / `EventSink`) to the
same Redis/RQ wiring as a real worker, so the API, queues, leases, cancellation and metrics all run
for real; only the tokens are fake. Each row gets the placeholder token `PLACEHOLDER` at
`tokens_per_s` tokens per second until `max_new_tokens` (finish reason `length`; stop sequences and
EOS are not simulated). Continuous batching: up to `max_batch_size` rows, newcomers join at the next
step and get their first token in it. No torch, no tokenizer, no weights.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from common.schemas import ErrorEvent, Event, FinalEvent, FinishReason, GenerationJob, Token, TokenEvent

from .metrics import EngineMetrics

log = logging.getLogger(__name__)

# id 0 and a plain word: valid UTF-8 text, not special, logprob 0 (probability 1).
PLACEHOLDER = Token(id=0, text=" tok", logprob=0.0, special=False)

Leaving = list[tuple[GenerationJob, "FinalEvent | ErrorEvent | None"]]


def next_step_at(previous_at: float, now: float, interval: float) -> float:
    """When the step after one that began at `previous_at` should begin.

    Steps are scheduled on a fixed grid (no drift from the time a step takes); a loop that fell more
    than one interval behind (a slow Redis round trip, a paused process) restarts the grid at `now`
    instead of bursting tokens to catch up."""
    scheduled = previous_at + interval
    return now if scheduled < now - interval else scheduled


@dataclass
class _Row:
    job: GenerationJob
    started_at: float
    tokens: list[Token] = field(default_factory=list)

    def emit(self) -> TokenEvent | FinalEvent:
        """The row's next token event; a FinalEvent once it reaches max_new_tokens."""
        job, token = self.job, PLACEHOLDER
        self.tokens.append(token)
        index = len(self.tokens) - 1
        if len(self.tokens) < job.stopping.max_new_tokens:
            return TokenEvent(request_id=job.request_id, attempt=job.attempt, index=index, token=token)
        return FinalEvent(
            request_id=job.request_id, attempt=job.attempt, index=index, token=token,
            generated_text="".join(t.text for t in self.tokens), finish_reason=FinishReason.LENGTH,
            generated_tokens=len(self.tokens), seed=job.sampling.seed if job.sampling.sampling else None,
            started_at=self.started_at, finished_at=time.time(),
            tokens=tuple(self.tokens) if job.want_tokens else (), prefill=())

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.job.stopping.max_new_tokens


class LoadTestLoop:
    """Continuous batching of placeholder tokens; the same `run()` contract as `worker.engine.Engine`."""

    def __init__(self, tokens_per_s: float, max_batch_size: int, source, sink,  # type: ignore[no-untyped-def]
                 metrics: EngineMetrics | None = None) -> None:
        if tokens_per_s <= 0:
            raise ValueError("tokens_per_s must be > 0")
        self.interval = 1.0 / tokens_per_s
        self.max_batch_size = max_batch_size
        self.source = source
        self.sink = sink
        self.metrics = metrics if metrics is not None else EngineMetrics(max_batch_size)
        self.rows: list[_Row] = []
        self.admitting = True

    def step(self) -> bool:
        """Admit, emit one token per row, publish, retire rows. True if any work was done."""
        events: list[Event] = []
        leaving: Leaving = []
        self._fetch(events, leaving)
        if not self.rows and not events:
            self.metrics.set_current_size(0)
            return False
        self.metrics.set_current_size(len(self.rows))
        for row in self.rows:
            event = row.emit()
            events.append(event)
            if isinstance(event, FinalEvent):
                leaving.append((row.job, event))
        self.rows = [r for r in self.rows if not r.done]
        if self.rows:
            self.metrics.observe_inference("decode", self.interval, True)  # the simulated step time
        cancelled = self.sink.step_done(events, [r.job for r in self.rows])
        if cancelled:
            for row in self.rows:
                if row.job.request_id in cancelled:
                    leaving.append((row.job, None))
            self.rows = [r for r in self.rows if r.job.request_id not in cancelled]
        if leaving:
            self.sink.finished(leaving)
        return True

    def _fetch(self, events: list[Event], leaving: Leaving) -> None:
        room = self.max_batch_size - len(self.rows)
        if not self.admitting or room <= 0:
            return
        jobs = self.source.fetch(room)
        if jobs:
            self.metrics.observe_next_size(len(jobs))
        now = time.time()
        for job in jobs:
            if job.stopping.max_new_tokens < 1:  # as the engine rejects it (the API validates first)
                error = ErrorEvent(request_id=job.request_id, attempt=job.attempt,
                                   message="Server error: `max_new_tokens` must be strictly positive",
                                   error_type="generation")
                events.append(error)
                leaving.append((job, error))
                continue
            self.rows.append(_Row(job, now))

    def run(self, should_stop: Callable[[], bool], grace_s: float, idle_wait_s: float = 1.0) -> None:
        """Step until `should_stop()`; then stop admitting, finish rows for up to `grace_s`, give back the rest."""
        deadline: float | None = None
        step_at: float | None = None  # when the next step may begin (None: at once)
        try:
            while True:
                if deadline is None and should_stop():
                    deadline = time.monotonic() + grace_s
                    self.admitting = False
                if deadline is not None and (not self.rows or time.monotonic() >= deadline):
                    break
                if step_at is not None and self.rows:
                    self._sleep_until(step_at, should_stop, deadline)
                    if deadline is None and should_stop():
                        continue
                scheduled = time.monotonic() if step_at is None else step_at  # this step's grid time
                if self.step():
                    step_at = next_step_at(scheduled, time.monotonic(), self.interval)
                else:
                    step_at = None
                    if deadline is None:
                        self.source.wait(idle_wait_s)
        finally:
            unfinished, self.rows = [r.job for r in self.rows], []
            if unfinished:
                try:
                    self.source.give_back(unfinished)
                except Exception:  # shutting down: report, never mask the reason we are stopping
                    log.exception("could not give back %d jobs", len(unfinished))

    @staticmethod
    def _sleep_until(when: float, should_stop: Callable[[], bool], deadline: float | None) -> None:
        """Sleep until `when` (monotonic), in slices so a stop request or the grace deadline is seen."""
        while True:
            now = time.monotonic()
            end = when if deadline is None else min(when, deadline)
            if now >= end or (deadline is None and should_stop()):
                return
            time.sleep(min(end - now, 0.05))
