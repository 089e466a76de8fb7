"""Overlap each step's Redis round trip with the next step's forward pass.

A decode step ends with one pipelined round trip (publish the step's events, read the rows' cancel
flags, renew leases). The main thread used to wait for its reply: a millisecond or more per step on
a busy 2-core host, where Redis and the API have to be scheduled first. `PipelinedJobs` hands that
round trip to one helper thread and lets the engine go on with the next step:

- at most one step's Redis work is in flight: `step_done` first waits for the previous step's reply,
  so a Redis outage still stops the loop after one step, as before;
- the helper thread runs every submission in order, so a row's events are published in step order
  and its final event before RQ records it finished (`finished` is submitted after `step_done`);
- what a reply says (cancelled rows, rows whose lease was lost) reaches the engine one step later:
  such a row computes one more token, which is not published (a lost lease is fenced in Redis; a
  cancelled client is gone).

The helper thread spends its time blocked on the socket (the GIL released); its Python work per step
is packing the pipeline and reading the reply.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

from common.schemas import ErrorEvent, Event, FinalEvent, GenerationJob

from .rq_worker import RedisJobs


class PipelinedJobs:
    """RequestSource and EventSink for the engine: `RedisJobs` with its step round trip overlapped."""

    def __init__(self, jobs: RedisJobs) -> None:
        self.jobs = jobs
        self._helper = ThreadPoolExecutor(1, thread_name_prefix="tgq-step-io")
        self._inflight: list[Future] = []
        self._step: Future | None = None

    # ---- EventSink -----------------------------------------------------------------------------
    def step_done(self, events: list[Event], running: list[GenerationJob]) -> set[str]:
        """Send this step's events and flags read; returns the ids the previous step's reply named."""
        previous = self.drain()
        # The metrics are read here, on the engine's thread, which is the one that updates them.
        increments, size = self.jobs.take_metric_increments(), self.jobs.current_batch_size()
        self._step = self._submit(self.jobs.step_done, events, running, increments, size)
        return previous

    def finished(self, leaving: Sequence[tuple[GenerationJob, FinalEvent | ErrorEvent | None]]) -> None:
        self._submit(self.jobs.finished, list(leaving))

    def drain(self) -> set[str]:
        """Wait for everything in flight; returns what the last step's reply named (re-raises its error)."""
        step, self._step = self._step, None
        inflight, self._inflight = self._inflight, []
        for future in inflight:
            future.result()
        return step.result() if step is not None else set()

    # ---- RequestSource -------------------------------------------------------------------------
    def fetch(self, max_jobs: int) -> list[GenerationJob]:
        return self.jobs.fetch(max_jobs)

    def wait(self, timeout: float) -> None:
        self.drain()  # the loop is idle: let the last finals and bookkeeping land first
        self.jobs.wait(timeout)

    def give_back(self, jobs: list[GenerationJob]) -> None:
        self.drain()
        self.jobs.give_back(jobs)

    def close(self) -> None:
        """Finish what is in flight, stop the helper thread, then close the Redis side."""
        try:
            self.drain()
        finally:
            self._helper.shutdown(wait=True)
            self.jobs.close()

    def _submit(self, fn, *args) -> Future:  # type: ignore[no-untyped-def]
        future = self._helper.submit(fn, *args)
        self._inflight.append(future)
        return future
