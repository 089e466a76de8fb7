"""The format-neutral core of a generation request: submit jobs, relay their events, cancel.

Every dialect (TGI's routes in `api.tgi.routes`, TGI 3's in `api.tgi.tgi3`, OpenAI's in `api.v1`) goes
through here: they map their request onto a `JobSpec`, submit it to a served model, and turn the events
of `GenerationService.events` into their own response format. No Flask here.
"""
from __future__ import annotations

import dataclasses
import functools
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import redis

from common.errors import ERROR_TYPES, GenerationError, IncompleteGeneration, ServiceError, Unavailable
from common.schemas import ErrorEvent, Event, FinalEvent, GenerationJob, SamplingParams, StoppingParams, TokenEvent

from .queue import JobQueue
from .replies import Relay, ReplyHub, Subscription

CLIENT_CHECK_S = 1.0  # how often a waiting request looks at its client's socket
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class ClientGone(Exception):
    """The HTTP client went away while its request was waiting."""


def error_from_event(event: ErrorEvent) -> ServiceError:
    """A worker's ErrorEvent as the ServiceError TGI would answer with."""
    cls = ERROR_TYPES.get(event.error_type, GenerationError)
    if cls is IncompleteGeneration:
        return IncompleteGeneration()
    return cls(event.message)  # type: ignore[call-arg]


@dataclass(frozen=True)
class JobSpec:
    """What to generate, in the workers' terms: one job per seed (best_of copies or n choices)."""
    input_ids: tuple[int, ...]
    sampling: SamplingParams
    stopping: StoppingParams
    seeds: tuple[int, ...]
    # every generated Token in the FinalEvent: non-stream details and logprobs, and every stream (its
    # final event fills any token event pub/sub lost)
    want_tokens: bool = False
    want_prefill: bool = False  # prompt logprobs (TGI's non-stream details)
    grammar: str | None = None  # the output constraint every one of these jobs follows (llguidance)


@dataclass
class Submission:
    """The jobs of one HTTP request and where their events arrive."""
    jobs: list[GenerationJob]
    subscription: Subscription
    relays: dict[str, Relay]
    enqueued_at: float
    deadline: float  # time.monotonic() after which the request answers incomplete_generation

    @property
    def request_ids(self) -> list[str]:
        return [job.request_id for job in self.jobs]

    @functools.cached_property
    def _choices(self) -> dict[str, int]:
        return {job.request_id: i for i, job in enumerate(self.jobs)}

    def choice(self, event: Event) -> int:
        """Which of the submission's jobs (in submission order) an event belongs to."""
        return self._choices[event.request_id]


class GenerationService:
    def __init__(self, hub: ReplyHub, request_timeout: float) -> None:
        self.hub = hub
        self.request_timeout = request_timeout

    def submit(self, queue: JobQueue, specs: Sequence[JobSpec]) -> Submission:
        """Subscribe, then enqueue one job per seed of each spec (the jobs' order is the choices')."""
        pairs = [(spec, seed) for spec in specs for seed in spec.seeds]
        ids = [uuid.uuid4().hex for _ in pairs]
        q = self.hub.register(ids)
        try:
            enqueued_at = time.time()
            jobs = [GenerationJob(
                request_id=rid, input_ids=spec.input_ids, sampling=dataclasses.replace(spec.sampling, seed=seed),
                stopping=spec.stopping, reply_to=self.hub.channel, want_tokens=spec.want_tokens,
                want_prefill=spec.want_prefill, attempt=0, enqueued_at=enqueued_at, grammar=spec.grammar)
                for rid, (spec, seed) in zip(ids, pairs, strict=True)]
            queue.enqueue(jobs)
        except BaseException:
            self.hub.unregister(ids)
            raise
        return Submission(jobs, Subscription(ids, q, queue.stored_result), {rid: Relay() for rid in ids},
                          enqueued_at, time.monotonic() + self.request_timeout)

    def events(self, sub: Submission, client_gone: Callable[[], bool] = lambda: False, *,
               tokens: bool = True, tick_s: float = CLIENT_CHECK_S) -> Iterator[TokenEvent | FinalEvent | None]:
        """Every job's events in arrival order until each has ended; None after min(`tick_s`, 1 s) of
        silence (the client's socket is looked at every second).

        Each token index is passed on once per job, in order (re-runs and repeats dropped); tokens
        lost in transit, and those after them, come out of the final event's tokens, or the request
        fails with LostTokens (incomplete_generation): never a hole. Raises the ServiceError of
        the first failed job, IncompleteGeneration past the deadline, Unavailable when Redis drops,
        ClientGone when `client_gone()` turns true. With `tokens=False` only final events come out.
        """
        last_check = time.monotonic()
        while sub.subscription.pending:
            now = time.monotonic()
            if now >= sub.deadline:
                raise IncompleteGeneration()
            if now - last_check >= CLIENT_CHECK_S:
                last_check = now
                if client_gone():
                    raise ClientGone()
            try:
                event = sub.subscription.next(min(sub.deadline - now, tick_s, CLIENT_CHECK_S))
            except REDIS_DOWN as exc:
                raise Unavailable() from exc
            if event is None:
                yield None
                continue
            if isinstance(event, TokenEvent) and not tokens:
                continue  # nothing of it reaches this client: only the outcome matters
            relay = sub.relays[event.request_id]  # the hub hands out only this submission's events
            accepted = relay.accept(event)
            if accepted is None:
                continue
            if isinstance(accepted, ErrorEvent):
                raise error_from_event(accepted)
            if isinstance(accepted, FinalEvent):
                if tokens:
                    yield from _recovered(relay, accepted)  # type: ignore[arg-type]
                sub.subscription.ended(accepted.request_id)
            yield accepted  # type: ignore[misc]

    def collect(self, sub: Submission, client_gone: Callable[[], bool] = lambda: False) -> list[FinalEvent]:
        """Every job's FinalEvent, in submission order."""
        finals: dict[str, FinalEvent] = {}
        for event in self.events(sub, client_gone, tokens=False):
            if isinstance(event, FinalEvent):
                finals[event.request_id] = event
        return [finals[rid] for rid in sub.request_ids]

    def release(self, sub: Submission) -> None:
        self.hub.unregister(sub.request_ids)


class LostTokens(IncompleteGeneration):
    """Tokens of a stream were lost in transit and its final event cannot fill the gap."""


def _recovered(relay: Relay, final: FinalEvent) -> Iterator[TokenEvent]:
    """Token events lost in transit (a dropped subscription, a missed pub/sub message) or held back
    behind such a loss, rebuilt in order from the final event's tokens; raises LostTokens when the
    final event does not carry them (the stream ends with an error rather than with a hole)."""
    missing = range(relay.last_index + 1, final.index)
    if missing and len(final.tokens) < final.index:
        raise LostTokens()
    for index in missing:
        relay.record(final.tokens[index].id)
        yield TokenEvent(final.request_id, final.attempt, index, final.tokens[index])
