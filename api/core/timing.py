"""A request's clock readings, for TGI's timing headers and the duration metrics of either dialect."""
from __future__ import annotations

import time
from dataclasses import dataclass

from common.schemas import FinalEvent


@dataclass(frozen=True)
class Timing:
    """A request's clock readings (epoch seconds) for TGI's headers and duration metrics."""
    start: float  # handler entered
    enqueued: float  # job(s) enqueued
    batched: float  # FinalEvent.started_at: the job joined a batch
    end: float

    @property
    def total(self) -> float:
        return max(0.0, self.end - self.start)

    @property
    def validation(self) -> float:
        return max(0.0, self.enqueued - self.start)

    @property
    def queue(self) -> float:
        return max(0.0, self.batched - self.enqueued)

    @property
    def inference(self) -> float:
        return max(0.0, self.end - self.batched)

    def per_token(self, generated_tokens: int) -> float:
        return self.inference / max(1, generated_tokens)


def timing_for(start: float, enqueued: float, final: FinalEvent, end: float | None = None) -> Timing:
    batched = min(max(final.started_at, enqueued), end or time.time())
    return Timing(start=start, enqueued=enqueued, batched=batched, end=end or time.time())
