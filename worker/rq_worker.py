"""The engine's RequestSource and EventSink over Redis and RQ.

RQ's stock workers run one job at a time (and the default one forks per job). tgq keeps one
resident model and runs many jobs in one batch, so it uses RQ for what RQ is good at — the queue,
job hashes, the started/finished/failed/canceled registries, worker registration, so `rq info` and
rq-dashboard tell the truth — and drives those transitions itself:

  fetch:    one script moves waiting job ids to RQ's intermediate queue, claims them and reads
            their hashes and cancel flags; one script call marks them all started, each only if its
            claim still holds (`worker.rq_bookkeeping`).
  step:     one pipeline per step: one fenced script call publishes one message per API process
            with its rows' events; the rows' cancel flags are read; leases are renewed, the batch
            metrics and the status hash written, at most once a second. PUBLISH's subscriber counts
            tell which API processes stopped listening (`Orphans`): their rows are dropped.
  finished: one pipeline records every row that left in the step: finished, failed or canceled.

So a step costs at most five round trips however many jobs join or leave in it (take: 2; publish the
newcomers' first tokens: 1; publish the decode step: 1; record the leavers: 1), plus the lease
reaper every few seconds.

A lease is the job's entry in RQ's started registry with a short expiry (`lease_ttl`); the reaper
(`common.reaper`, run by every worker and API process) re-queues jobs whose lease expired because
their worker died. A worker that was only stalled (SIGSTOP, a swapped-out host) cannot publish for
a reaped job: every publish goes through a Redis script that first checks the leases (FENCED_STEP,
one ZMSCORE and one PUBLISH per API process for all of a step's events).
A refused publish tells the worker to drop that row silently: the re-run owns it now.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import redis
from rq import Queue, SimpleWorker
from rq.exceptions import DeserializationError
from rq.executions import Execution
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from common import protocol
from common.reaper import failure_reason, reap_expired, reap_stranded, success_result
from common.redis_client import PipelinedScript
from common.schemas import JOB_VERSION, ErrorEvent, Event, FinalEvent, GenerationJob

from .rq_bookkeeping import (CLAIMED_WRITES, TAKE_JOBS, ClaimedWrites, mark_canceled, mark_failed, mark_started,
                             mark_succeeded, restore_job)

log = logging.getLogger(__name__)
T = TypeVar("T")


def generate(payload: dict[str, Any]) -> None:
    """The function name RQ records for tgq jobs; only tgq's batching worker may take them."""
    raise RuntimeError("tgq jobs are run by `tgq worker` (a batching worker), not by `rq worker`")


class BatchWorker(SimpleWorker):
    """An RQ worker that never runs `work()`: it only keeps RQ's bookkeeping for a batching loop."""

    lease_ttl = 15  # seconds; a dead worker's jobs are reaped this long after its last renewal

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.lease_ttl


@dataclass
class Running:
    """A job taken off the queue and held by this worker."""
    job: GenerationJob
    rq_job: Job
    execution: Execution


def retry_redis(fn: Callable[[], T], what: str, stop: Callable[[], bool] = lambda: False) -> T:
    """Run `fn`, waiting out a Redis outage with capped backoff instead of crashing the worker."""
    delay = 0.25
    while True:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if stop():
                raise
            log.warning("redis unreachable during %s (%s); retrying in %.1f s", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


# One call per step for the whole batch. First the fence: one ZMSCORE over the started-registry entries
# (leases) of every row with events. If any entry is gone (a reaper handed that job to another worker
# while this one was stalled: SIGSTOP, a swapped-out host), nothing is published and the lost rows are
# named, so the worker drops them and sends the step again without them. Else one PUBLISH per reply
# message (one per API process: all of its rows' events), and the step's final results are stored.
# Returns {1, subscriber count per message} or {0, lost flag per member}.
# KEYS: the started registry, one reply channel per message, one result key per stored result.
# ARGV: member count m, m members, message count p, p messages, the stored results' data.
FENCED_STEP = """
local m = tonumber(ARGV[1])
if m > 0 then
  local scores = redis.call('ZMSCORE', KEYS[1], unpack(ARGV, 2, m + 1))
  local lost, any = {}, false
  for i = 1, m do
    if scores[i] then lost[i] = 0 else lost[i] = 1; any = true end
  end
  if any then return {0, lost} end
end
local p = tonumber(ARGV[m + 2])
local counts = {}
for i = 1, p do counts[i] = redis.call('PUBLISH', KEYS[i + 1], ARGV[m + 2 + i]) end
for i = p + 2, #KEYS do redis.call('SET', KEYS[i], ARGV[m + 1 + i], 'EX', %d) end
return {1, counts}
""" % protocol.RESULT_TTL_S


@dataclass
class StepCall:
    """KEYS and ARGV of one FENCED_STEP call, built from a step's events."""
    keys: list[str]
    args: list[Any]
    members: list[str]  # request id of each fenced member, in ARGV order
    channels: list[str]  # the channel of each message, in order


def step_call(registry_key: str, events: list[Event], held: dict[str, "Running"]) -> StepCall:
    """One message per channel for v2 jobs (all their events of the step, in order), one per event
    for v1 jobs (an API of the previous release); results stored for final and error events."""
    members: dict[str, str] = {}
    grouped: dict[str, list[Event]] = {}
    messages: list[tuple[str, bytes]] = []
    results: list[tuple[str, bytes]] = []
    for event in events:
        running = held[event.request_id]
        members.setdefault(event.request_id, running.execution.composite_key)
        channel = running.job.reply_to
        if running.job.version >= protocol.STEP_VERSION:
            grouped.setdefault(channel, []).append(event)
        else:
            messages.append((channel, protocol.encode_event(event)))
        if isinstance(event, (FinalEvent, ErrorEvent)):
            results.append((protocol.result_key(event.request_id), protocol.encode_event(event)))
    messages += [(channel, protocol.encode_step(step)) for channel, step in grouped.items()]
    keys = [registry_key, *(c for c, _ in messages), *(k for k, _ in results)]
    args: list[Any] = [len(members), *members.values(), len(messages), *(d for _, d in messages),
                       *(d for _, d in results)]
    return StepCall(keys, args, list(members), [c for c, _ in messages])


class Orphans:
    """Reply channels that no API process has listened to for longer than the grace period.

    PUBLISH answers how many subscribers got each step's message. A channel that keeps answering 0
    belongs to an API process that is gone (killed, OOM, rescheduled); its rows are dropped. The
    grace period rides out a Redis blip, a resubscription and a Sentinel failover. An API process of
    the previous release subscribes the same way, so it is never taken for dead while it listens."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._silent_since: dict[str, float] = {}

    def heard(self, channels: list[str], counts: list[int], now: float) -> set[str]:
        """Record one step's subscriber counts; returns the channels silent for longer than the grace."""
        listened: dict[str, bool] = {}
        for channel, count in zip(channels, counts):
            listened[channel] = listened.get(channel, False) or int(count) > 0
        for channel, yes in listened.items():
            if yes:
                self._silent_since.pop(channel, None)
            else:
                self._silent_since.setdefault(channel, now)
        return {c for c, since in self._silent_since.items() if now - since > self.grace_s}

    def forget(self, live_channels: set[str]) -> None:
        """Drop the record of channels no held row replies to any more."""
        for channel in list(self._silent_since):
            if channel not in live_channels:
                del self._silent_since[channel]


def attempt_of(rq_job: Job) -> int:
    return int((rq_job.meta or {}).get("attempt", 0))


class StatusWriter:
    """What `tgq status` shows of this worker, written into a step's pipeline at most once a second."""

    EVERY_S = 1.0
    TTL_S = 10

    def __init__(self, key: str, model_id: str, capacity: int) -> None:
        self.key = key
        self.fixed = {"host": socket.gethostname(), "pid": os.getpid(), "model": model_id, "capacity": capacity}
        self._tokens = 0  # generated since the last write
        self._since = time.monotonic()

    def write(self, pipe: redis.client.Pipeline, *, rows: int, tokens: int) -> None:
        self._tokens += tokens
        elapsed = time.monotonic() - self._since
        if elapsed < self.EVERY_S:
            return
        pipe.hset(self.key, mapping={**self.fixed, "rows": rows, "tok_s": round(self._tokens / elapsed, 1),
                                     "at": time.time()})
        pipe.expire(self.key, self.TTL_S)
        self._tokens, self._since = 0, time.monotonic()


class RedisJobs:
    """RequestSource and EventSink for `worker.engine.Engine`, backed by one RQ queue."""

    def __init__(self, connection: redis.Redis, worker: BatchWorker, queue: Queue, model_id: str,
                 max_attempts: int = 3, renew_every_s: float = 1.0, reap_every_s: float = 2.0,
                 batch_key_ttl_s: int = 10, capacity: int = 0, orphan_grace_s: float = 12.0) -> None:
        self.redis = connection
        self.worker = worker
        self.queue = queue
        self.model_id = model_id
        self.started_registry = StartedJobRegistry(queue.name, connection, serializer=JSONSerializer)
        self.held: dict[str, Running] = {}
        self.lost: set[str] = set()  # held jobs whose lease was reaped; dropped at the next step
        self._fenced_step = PipelinedScript(connection, FENCED_STEP)
        self.orphans = Orphans(orphan_grace_s)
        self._pending_increments: dict[str, float] = {}  # metrics added up between once-a-second writes
        self._last_flush = 0.0
        self._written_size: int | None = None
        self._claimed_writes = PipelinedScript(connection, CLAIMED_WRITES)
        self._stash: list[str] = []  # ids a blocking wait moved to the intermediate queue
        self._take_jobs = connection.register_script(TAKE_JOBS)
        self._renew_every_s = renew_every_s
        self._last_renewal = 0.0
        self._batch_key = protocol.worker_batch_key(model_id, worker.name)
        self._batch_key_ttl_s = batch_key_ttl_s
        self.max_attempts = max_attempts
        self._reap_every_s = reap_every_s
        self._last_reap = 0.0
        # The engine's metrics hand over their Redis hash increments here, flushed once per step.
        self.take_metric_increments: Callable[[], dict[str, float]] = dict
        # The true batch size (running rows, not local waiting jobs), for tgi_batch_current_size.
        self.current_batch_size: Callable[[], int] = lambda: 0
        # Queue length read in each step's pipeline: while it is 0, fetch costs no round trip.
        self._waiting_hint = 1
        self.status = StatusWriter(protocol.worker_status_key(model_id, worker.name), model_id, capacity)

    # ---- RequestSource -------------------------------------------------------------------
    def fetch(self, max_jobs: int) -> list[GenerationJob]:
        """Take up to `max_jobs` waiting jobs and mark them started: two round trips for any number."""
        if max_jobs <= 0 or (self._waiting_hint <= 0 and not self._stash):
            return []
        return retry_redis(lambda: self._fetch(max_jobs), "fetch")

    def _fetch(self, max_jobs: int) -> list[GenerationJob]:
        taken = self._take(max_jobs)
        if not taken:
            return []
        try:
            return self._claimed_writes.retrying(lambda: self._start(taken))
        except (redis.ConnectionError, redis.TimeoutError):
            # Still claimed by this worker in the intermediate queue: the retry takes them again.
            self._stash = [raw_id.decode() for raw_id, _, _ in taken] + self._stash
            raise

    def _take(self, max_jobs: int) -> list[Any]:
        """Move up to `max_jobs` waiting jobs to RQ's intermediate queue, claimed for this worker."""
        earlier, self._stash = self._stash[:max_jobs], self._stash[max_jobs:]
        more = max_jobs - len(earlier)
        taken, waiting = self._take_jobs(keys=[self.queue.key, self.queue.intermediate_queue_key],
                                         args=[more, Job.redis_job_namespace_prefix, protocol.cancel_key(""),
                                               protocol.claim_key(""), self.worker.name, protocol.CLAIM_TTL_S,
                                               *earlier])
        self._waiting_hint = int(waiting)
        return list(taken)

    def _start(self, taken: list[Any]) -> list[GenerationJob]:
        """Mark the taken jobs started (or cancelled, or failed) where this worker's claim still holds."""
        writes = ClaimedWrites(self.redis, self.worker.name)
        candidates: list[tuple[GenerationJob, Running] | None] = []
        rq_jobs = [(restore_job(raw_id.decode(), fields, self.queue), cancelled) for raw_id, cancelled, fields in taken]
        absent = self._absent_api_processes([rq_job for rq_job, _ in rq_jobs])
        for rq_job, cancelled in rq_jobs:
            pipe = writes.for_job(rq_job.id)
            if cancelled:  # the client left (or its deadline passed) while it waited: never run it
                mark_canceled(pipe, self.worker, self.queue, rq_job, None)
                candidates.append(None)
                continue
            job = self._decode(rq_job, pipe)
            if job is None:
                candidates.append(None)
                continue
            if job.reply_to in absent:  # its API process died while it waited: nobody would read it
                log.warning("job %s: its API process is gone (%s); recorded as canceled, not run",
                            rq_job.id, job.reply_to)
                mark_canceled(pipe, self.worker, self.queue, rq_job, None)
                candidates.append(None)
                continue
            execution = mark_started(pipe, self.worker, self.queue, rq_job, self.worker.lease_ttl)
            candidates.append((job, Running(job, rq_job, execution)))
        keys, args = writes.script_call()
        with self.redis.pipeline(transaction=False) as pipe:
            self._claimed_writes.queue(pipe, keys, args)
            if any(candidates):
                self.worker.set_state(WorkerStatus.BUSY, pipeline=pipe)
            written = pipe.execute()[0]
        started: list[GenerationJob] = []
        for job_id, candidate, ok in zip(writes.job_ids, candidates, written):
            if not ok:
                log.warning("job %s: put back on the queue while this worker was stalled; left to its new taker",
                            job_id)
                if candidate is not None:
                    self.worker.executions.pop(candidate[1].execution.id, None)
            elif candidate is not None:
                job, running = candidate
                self.held[job.request_id] = running
                started.append(job)
        return started

    def _absent_api_processes(self, rq_jobs: list[Job]) -> set[str]:
        """Reply channels of v2 jobs whose API process is gone: its presence key has expired and
        nobody is subscribed to the channel (one round trip; a second, `PUBSUB NUMSUB`, only for
        channels whose key is missing). The subscriber count is the authority: an overloaded API
        process can be late renewing its key, and its queued jobs must not be cancelled for that.

        A v1 job comes from an API of the previous release, which keeps no presence key: it is
        started, and dropped later only if its channel stays silent (`Orphans`)."""
        channels: set[str] = set()
        for rq_job in rq_jobs:
            try:
                payload = rq_job.args[0]
                if int(payload.get("v", 1)) >= protocol.STEP_VERSION and isinstance(payload["reply_to"], str):
                    channels.add(payload["reply_to"])
            except (DeserializationError, IndexError, KeyError, TypeError, ValueError, AttributeError):
                continue  # _decode fails it with the reason
        if not channels:
            return set()
        ordered = sorted(channels)
        with self.redis.pipeline(transaction=False) as pipe:
            for channel in ordered:
                pipe.exists(protocol.presence_key(channel))
            keyless = [c for c, yes in zip(ordered, pipe.execute()) if not yes]
        if not keyless:
            return set()
        counts = {(c.decode() if isinstance(c, bytes) else c): int(n) for c, n in self.redis.pubsub_numsub(*keyless)}
        return {c for c in keyless if not counts.get(c)}

    def _decode(self, rq_job: Job, pipe: redis.client.Pipeline) -> GenerationJob | None:
        """The job's payload, or None after failing it (a payload that is not a tgq job)."""
        raw: object = None
        try:  # JSON only (RQ's JSONSerializer): a pickled payload fails to decode, it is never unpickled
            raw = rq_job.args[0]
            payload = dict(raw)  # type: ignore[call-overload]
            payload["attempt"] = attempt_of(rq_job)
            job = GenerationJob.from_dict(payload)
            if job.version > JOB_VERSION:  # a newer API's job: its fields may mean more than this worker knows
                raise ValueError(f"job format v{job.version} is newer than this worker runs (v{JOB_VERSION}); "
                                 "upgrade the worker")
        except (DeserializationError, IndexError, KeyError, TypeError, ValueError) as exc:
            reason = f"invalid job payload: {exc!r}"
            log.error("job %s: %s", rq_job.id, reason)
            mark_failed(pipe, self.worker, self.queue, rq_job, None, reason)
            reply_to = raw.get("reply_to") if isinstance(raw, dict) else None
            if isinstance(reply_to, str):  # answer the request if the payload says where
                event = ErrorEvent(rq_job.id, attempt_of(rq_job), reason, "generation")
                pipe.publish(reply_to, protocol.encode_event(event))
            return None
        rq_job.meta["max_attempts"] = self.max_attempts  # the reaper counts runs against the taker's limit
        return job

    def wait(self, timeout: float) -> None:
        """Block on the queue for up to `timeout` s; a job that arrives is kept for the next fetch."""
        retry_redis(lambda: self._wait(timeout), "wait")

    def _wait(self, timeout: float) -> None:
        self._maybe_reap()
        if self._stash:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self._batch_key, 0, ex=self._batch_key_ttl_s)  # idle: no rows held
            self._written_size = 0
            self.status.write(pipe, rows=0, tokens=0)
            if self._pending_increments:
                self._flush_metrics(pipe)
            pipe.execute()
        popped = self.redis.blmove(self.queue.key, self.queue.intermediate_queue_key, max(1, int(timeout)))
        if popped is not None:
            self._stash.append(popped.decode())
            self._waiting_hint = 1  # a burst may be arriving: look again on the next fetch
        else:
            self.worker.heartbeat()

    def give_back(self, jobs: list[GenerationJob]) -> None:
        """Put unfinished jobs back at the head of the queue (warm shutdown), attempt unchanged."""
        retry_redis(lambda: self._give_back(jobs), "give_back")

    def _give_back(self, jobs: list[GenerationJob]) -> None:
        for job in jobs:
            running = self.held.pop(job.request_id, None)
            if running is None or job.request_id in self.lost:
                self.lost.discard(job.request_id)
                continue
            with self.redis.pipeline() as pipe:
                self.worker.cleanup_execution(running.rq_job, pipeline=pipe, execution=running.execution)
                pipe.execute()
            self.queue.enqueue_job(running.rq_job, at_front=True)

    # ---- EventSink -----------------------------------------------------------------------
    def step_done(self, events: list[Event], running: list[GenerationJob],
                  increments: dict[str, float] | None = None, batch_size: int | None = None) -> set[str]:
        """Publish the step's events, read the rows' cancel flags, renew leases: one round trip.

        `increments` and `batch_size` are the engine's metrics for the step (read from
        `take_metric_increments` and `current_batch_size` when not given). During a Redis outage the
        loop waits here (re-sending is harmless: the API drops token indexes it already relayed)."""
        if increments is None:
            increments = self.take_metric_increments()
        if batch_size is None:
            batch_size = self.current_batch_size()

        return retry_redis(lambda: self._fenced_step.retrying(
            lambda: self._step_done(events, running, increments, batch_size)), "step")

    def _step_done(self, events: list[Event], running: list[GenerationJob], increments: dict[str, float],
                   batch_size: int) -> set[str]:
        now = time.monotonic()
        renewing = now - self._last_renewal >= self._renew_every_s
        for field, amount in increments.items():
            self._pending_increments[field] = self._pending_increments.get(field, 0) + amount
        flushing = now - self._last_flush >= self.status.EVERY_S
        sendable = [e for e in events if e.request_id in self.held and e.request_id not in self.lost]
        refused_now: set[str] = set()
        while True:
            call = step_call(self.started_registry.key, sendable, self.held)
            pipe = self.redis.pipeline(transaction=False)
            if running:  # first, so its reply is results[0]
                pipe.mget([protocol.cancel_key(job.request_id) for job in running])
            if call.members or call.channels:
                self._fenced_step.queue(pipe, call.keys, call.args)
            if renewing:
                self._renew_leases(pipe, running)
            if batch_size != self._written_size or flushing:  # a change, or once a second
                pipe.set(self._batch_key, batch_size, ex=self._batch_key_ttl_s)
                self._written_size = batch_size
            self.status.write(pipe, rows=batch_size, tokens=sum(not isinstance(e, ErrorEvent) for e in events))
            if flushing:
                self._flush_metrics(pipe)
            pipe.llen(self.queue.key)
            results = pipe.execute()
            renewing = flushing = False  # done in this round trip, whatever the fence said
            self._waiting_hint = int(results[-1])
            flags = results[0] if running else []
            reply = results[1 if running else 0] if (call.members or call.channels) else [1, []]
            if int(reply[0]) == 1:
                break
            refused = {rid for rid, lost in zip(call.members, reply[1]) if int(lost)}
            for rid in refused - self.lost:
                log.warning("job %s: lease lost while this worker was stalled; its events were not sent", rid)
            self.lost |= refused
            refused_now |= refused
            sendable = [e for e in sendable if e.request_id not in refused]
        self._maybe_reap()
        cancelled = {job.request_id for job, flag in zip(running, flags) if flag is not None}
        return refused_now | cancelled | self._orphaned(call.channels, reply[1], running)

    def _orphaned(self, channels: list[str], counts: list[int], running: list[GenerationJob]) -> set[str]:
        """Rows whose API process has not listened for longer than the grace period: dropped."""
        dead = self.orphans.heard(channels, counts, time.monotonic())
        self.orphans.forget({job.reply_to for job in running})
        if not dead:
            return set()
        orphans = {job.request_id for job in running if job.reply_to in dead}
        if orphans:
            log.warning("%d rows reply to API processes that stopped listening %.0f s ago (%s); dropped",
                        len(orphans), self.orphans.grace_s, ", ".join(sorted(dead)))
        return orphans

    def _maybe_reap(self) -> None:
        """Every few seconds, recover jobs of dead workers (any live worker does it)."""
        if time.monotonic() - self._last_reap < self._reap_every_s:
            return
        self._last_reap = time.monotonic()
        requeued = reap_expired(self.redis, self.queue, self.max_attempts) + reap_stranded(self.redis, self.queue)
        if requeued:
            self._waiting_hint = 1  # jobs (maybe) went back on the queue

    def _flush_metrics(self, pipe: redis.client.Pipeline) -> None:
        """The batch metrics added up since the last write, written at most once a second."""
        self._last_flush = time.monotonic()
        increments, self._pending_increments = self._pending_increments, {}
        key = protocol.batch_metrics_key(self.model_id)
        for field, amount in increments.items():
            if float(amount).is_integer():
                pipe.hincrby(key, field, int(amount))
            else:
                pipe.hincrbyfloat(key, field, amount)

    def _renew_leases(self, pipe: redis.client.Pipeline, running: list[GenerationJob]) -> None:
        """Extend the started-registry expiry of every held job in one ZADD, and the worker's heartbeat.

        XX: an entry a reaper removed (its lease had expired) is not brought back."""
        self._last_renewal = time.monotonic()
        until = time.time() + self.worker.lease_ttl
        leases = {held.execution.composite_key: until for job in running
                  if (held := self.held.get(job.request_id)) is not None and job.request_id not in self.lost}
        if leases:
            pipe.zadd(self.started_registry.key, leases, xx=True)
        self.worker.heartbeat(self.worker.worker_ttl, pipeline=pipe)

    def finished(self, leaving: Sequence[tuple[GenerationJob, FinalEvent | ErrorEvent | None]]) -> None:
        """Record in RQ how the step's leaving rows ended: one round trip for all of them."""
        ended: list[tuple[Running, FinalEvent | ErrorEvent | None]] = []
        for job, event in leaving:
            held = self.held.pop(job.request_id, None)
            if job.request_id in self.lost:  # another worker owns the job now: leave RQ alone
                self.lost.discard(job.request_id)
            elif held is not None:
                ended.append((held, event))
        if ended:
            retry_redis(lambda: self._finished(ended), "finish")

    def _finished(self, ended: list[tuple[Running, FinalEvent | ErrorEvent | None]]) -> None:
        with self.redis.pipeline() as pipe:
            for held, event in ended:
                rq_job, execution = held.rq_job, held.execution
                if isinstance(event, FinalEvent):
                    mark_succeeded(pipe, self.worker, rq_job, execution, success_result(event))
                elif isinstance(event, ErrorEvent):
                    mark_failed(pipe, self.worker, self.queue, rq_job, execution, failure_reason(event))
                else:
                    mark_canceled(pipe, self.worker, self.queue, rq_job, execution)
            if not self.held:
                self.worker.set_state(WorkerStatus.IDLE, pipeline=pipe)
            try:
                pipe.execute()
            except redis.ResponseError:
                log.exception("could not record the end of %d jobs in RQ", len(ended))

    def close(self) -> None:
        """On exit: a job popped by `wait` but never fetched goes back to the head of the queue."""
        def requeue_stash() -> None:
            with self.redis.pipeline() as pipe:
                for job_id in reversed(self._stash):  # at the head, in their original order
                    pipe.lrem(self.queue.intermediate_queue_key, 1, job_id)
                    pipe.lpush(self.queue.key, job_id)
                pipe.delete(self._batch_key, self.status.key)
                if self._pending_increments:
                    self._flush_metrics(pipe)
                pipe.execute()
            self._stash.clear()

        retry_redis(requeue_stash, "close")
