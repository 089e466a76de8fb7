"""One generation request's life between validation and the response: submit, wait, cancel.

Shared by `/generate`, `/generate_stream`, the compat routes and `/health`; no Flask here.
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from common.errors import ERROR_TYPES, GenerationError, IncompleteGeneration, ServiceError
from common.schemas import ErrorEvent, FinalEvent, GenerationJob, TokenEvent
from common.settings import LimitSettings

from .queue import JobQueue
from .replies import Relay, ReplyHub, Subscription
from .validation import ValidRequest, random_seed

CLIENT_CHECK_S = 1.0  # how often a non-stream request looks at its client's socket


class ClientGone(Exception):
    """The HTTP client went away while its request was waiting."""


def error_from_event(event: ErrorEvent) -> ServiceError:
    """A worker's ErrorEvent as the ServiceError TGI would answer with."""
    cls = ERROR_TYPES.get(event.error_type, GenerationError)
    if cls is IncompleteGeneration:
        return IncompleteGeneration()
    return cls(event.message)  # type: ignore[call-arg]


@dataclass
class Submission:
    """The jobs of one HTTP request (best_of copies) and where their events arrive."""
    jobs: list[GenerationJob]
    subscriptions: list[Subscription]
    relays: list[Relay]
    enqueued_at: float

    @property
    def request_ids(self) -> list[str]:
        return [job.request_id for job in self.jobs]


class GenerationService:
    def __init__(self, queue: JobQueue, hub: ReplyHub, limits: LimitSettings, request_timeout: float) -> None:
        self.queue = queue
        self.hub = hub
        self.limits = limits
        self.request_timeout = request_timeout

    def admit(self, copies: int) -> None:
        """The 429 check: raises Overloaded when `copies` more jobs would pass the queue limit."""
        self.queue.check_capacity(copies, self.limits.max_queue_length)

    def submit(self, valid: ValidRequest, *, stream: bool) -> Submission:
        """Subscribe, then enqueue one job per best_of copy (each with its own seed)."""
        ids = [uuid.uuid4().hex for _ in range(valid.best_of)]
        queues = self.hub.register(ids)
        try:
            seeds = [valid.sampling.seed] if valid.seed_given else [random_seed() for _ in ids]
            enqueued_at = time.time()
            jobs = [GenerationJob(
                request_id=rid, input_ids=valid.input_ids,
                sampling=dataclasses.replace(valid.sampling, seed=seed), stopping=valid.stopping,
                reply_to=self.hub.channel,
                want_tokens=not stream and (valid.details or valid.best_of > 1),
                want_prefill=not stream and valid.details,
                attempt=0, enqueued_at=enqueued_at) for rid, seed in zip(ids, seeds, strict=True)]
            self.queue.enqueue(jobs)
        except BaseException:
            self.hub.unregister(ids)
            raise
        subs = [Subscription(rid, q, self.queue.stored_result) for rid, q in zip(ids, queues, strict=True)]
        return Submission(jobs, subs, [Relay() for _ in ids], enqueued_at)

    def deadline(self) -> float:
        return time.monotonic() + self.request_timeout

    def collect(self, sub: Submission, deadline: float,
                client_gone: Callable[[], bool] = lambda: False) -> list[FinalEvent]:
        """Wait for every copy's FinalEvent; raises the first error, IncompleteGeneration, ClientGone."""
        finals: list[FinalEvent] = []
        last_check = time.monotonic()
        for subscription, relay in zip(sub.subscriptions, sub.relays, strict=True):
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise IncompleteGeneration()
                if now - last_check >= CLIENT_CHECK_S:
                    last_check = now
                    if client_gone():
                        raise ClientGone()
                event = subscription.next(min(deadline - now, CLIENT_CHECK_S))
                if event is None or isinstance(event, TokenEvent):
                    continue  # nothing was sent to this client yet: only the outcome matters
                accepted = relay.accept(event)
                if accepted is None:
                    continue
                if isinstance(accepted, ErrorEvent):
                    raise error_from_event(accepted)
                finals.append(accepted)
                break
        return finals

    def cancel(self, sub: Submission) -> None:
        self.queue.cancel(sub.request_ids)

    def release(self, sub: Submission) -> None:
        self.hub.unregister(sub.request_ids)
