"""The engine's RequestSource and EventSink over Redis and RQ.

RQ's stock workers run one job at a time (and the default one forks per job). tgq keeps one
resident model and runs many jobs in one batch, so it uses RQ for what RQ is good at — the queue,
job hashes, the started/finished/failed/canceled registries, worker registration, so `rq info` and
rq-dashboard tell the truth — and drives those transitions itself:

  fetch:    LMOVE a job id off the queue (non-blocking), create its Execution, mark it started.
  step:     one pipeline per step publishes every row's events, renews the rows' leases (at most
            once a second), reads their cancel flags and adds the batch metrics.
  finished: RQ's own success/failure handlers; cancelled rows end up in the canceled registry.

A lease is the job's entry in RQ's started registry with a short expiry (`lease_ttl`); the reaper
(`common.reaper`, run by every worker and API process) re-queues jobs whose lease expired because
their worker died. A worker that was only stalled (SIGSTOP, a swapped-out host) cannot publish for
a reaped job: every publish goes through a Redis script that first checks the lease (FENCED_PUBLISH).
A refused publish tells the worker to drop that row silently: the re-run owns it now.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import redis
from rq import Queue, SimpleWorker
from rq.exceptions import DequeueTimeout, DeserializationError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, FailedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import now

from common import protocol
from common.reaper import reap_expired, reap_stranded
from common.schemas import ErrorEvent, Event, FinalEvent, GenerationJob

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


# Publish (and store a final result) only while this worker's lease entry is still in the started
# registry. Checked by Redis itself, so a worker that was stopped anywhere in its step (SIGSTOP,
# a stalled host) can never send events for a job that a reaper has handed to another worker.
# KEYS: started registry, reply channel, result key. ARGV: lease member, event, result TTL (0: none).
FENCED_PUBLISH = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('PUBLISH', KEYS[2], ARGV[2])
if ARGV[3] ~= '0' then redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3]) end
return 1
"""


def attempt_of(rq_job: Job) -> int:
    return int((rq_job.meta or {}).get("attempt", 0))


class RedisJobs:
    """RequestSource and EventSink for `worker.engine.Engine`, backed by one RQ queue."""

    def __init__(self, connection: redis.Redis, worker: BatchWorker, queue: Queue, model_id: str,
                 max_attempts: int = 3, renew_every_s: float = 1.0, reap_every_s: float = 2.0,
                 batch_key_ttl_s: int = 10) -> None:
        self.redis = connection
        self.worker = worker
        self.queue = queue
        self.model_id = model_id
        self.started_registry = StartedJobRegistry(queue.name, connection, serializer=JSONSerializer)
        self.held: dict[str, Running] = {}
        self.lost: set[str] = set()  # held jobs whose lease was reaped; dropped at the next step
        self._fenced_publish = connection.register_script(FENCED_PUBLISH)
        self._stash: list[tuple[Job, Queue]] = []
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

    # ---- RequestSource -------------------------------------------------------------------
    def fetch(self, max_jobs: int) -> list[GenerationJob]:
        return retry_redis(lambda: self._fetch(max_jobs), "fetch")

    def _fetch(self, max_jobs: int) -> list[GenerationJob]:
        taken: list[GenerationJob] = []
        while len(taken) < max_jobs:
            if self._stash:
                rq_job, queue = self._stash.pop(0)
            else:
                if self._waiting_hint <= 0:
                    break
                popped = Queue.dequeue_any([self.queue], None, connection=self.redis, serializer=JSONSerializer)
                if popped is None:
                    self._waiting_hint = 0
                    break
                rq_job, queue = popped
            job = self._take(rq_job)
            if job is not None:
                taken.append(job)
        return taken

    def wait(self, timeout: float) -> None:
        """Block on the queue for up to `timeout` s; a job that arrives is kept for the next fetch."""
        retry_redis(lambda: self._wait(timeout), "wait")

    def _wait(self, timeout: float) -> None:
        self._maybe_reap()
        if self._stash:
            return
        self.redis.set(self._batch_key, 0, ex=self._batch_key_ttl_s)  # idle: no rows held
        try:
            popped = Queue.dequeue_any([self.queue], max(1, int(timeout)), connection=self.redis,
                                       serializer=JSONSerializer)
        except DequeueTimeout:
            popped = None
        if popped is not None:
            self._stash.append(popped)
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

    def _take(self, rq_job: Job) -> GenerationJob | None:
        """Mark a dequeued job started and decode its payload; None if it must not run."""
        if self.redis.lpos(self.queue.intermediate_queue_key, rq_job.id) is None:
            # Held so long (a stopped process) that a reaper put it back on the queue: not ours.
            log.warning("job %s: no longer ours (re-queued by a reaper); skipped", rq_job.id)
            return None
        if self.redis.exists(protocol.cancel_key(rq_job.id)):
            # The client left (or its deadline passed) while the job waited: never run it.
            self.redis.lrem(self.queue.intermediate_queue_key, 1, rq_job.id)
            rq_job.cancel()
            return None
        raw: object = None
        try:  # decoded before anything else touches the job: RQ itself would try and crash on it
            raw = rq_job.args[0]  # JSON only (RQ's JSONSerializer): never unpickled
            payload = dict(raw)  # type: ignore[call-overload]
            payload["attempt"] = attempt_of(rq_job)
            job = GenerationJob.from_dict(payload)
        except (DeserializationError, IndexError, KeyError, TypeError, ValueError) as exc:
            reply_to = raw.get("reply_to") if isinstance(raw, dict) else None
            self._reject(rq_job, f"invalid job payload: {exc!r}", reply_to if isinstance(reply_to, str) else None)
            return None
        # The reaper counts runs against the limit of the worker that took the job.
        rq_job.meta["max_attempts"] = self.max_attempts
        rq_job.save_meta()
        execution = self.worker.prepare_execution(rq_job)
        self.worker.prepare_job_execution(rq_job, remove_from_intermediate_queue=True)
        self.held[job.request_id] = Running(job, rq_job, execution)
        return job

    def _reject(self, rq_job: Job, reason: str, reply_to: str | None) -> None:
        """Fail a job that cannot be decoded, without running it; answer its request if it says where."""
        log.error("job %s: %s", rq_job.id, reason)
        with self.redis.pipeline() as pipe:
            pipe.lrem(self.queue.intermediate_queue_key, 1, rq_job.id)
            rq_job.set_status(JobStatus.FAILED, pipeline=pipe)
            FailedJobRegistry(self.queue.name, self.redis, serializer=JSONSerializer).add(
                rq_job, ttl=rq_job.failure_ttl, exc_string=reason, pipeline=pipe)
            Result.create_failure(rq_job, rq_job.failure_ttl, exc_string=reason, pipeline=pipe)
            if reply_to is not None:
                event = ErrorEvent(rq_job.id, attempt_of(rq_job), reason, "generation")
                pipe.publish(reply_to, protocol.encode_event(event))
            pipe.execute()

    # ---- EventSink -----------------------------------------------------------------------
    def step_done(self, events: list[Event], running: list[GenerationJob]) -> set[str]:
        """Publish the step's events, read the rows' cancel flags, renew leases: one round trip.

        During a Redis outage the loop waits here (re-sending is harmless: the API drops token
        indexes it already relayed)."""
        return retry_redis(lambda: self._step_done(events, running), "step")

    def _step_done(self, events: list[Event], running: list[GenerationJob]) -> set[str]:
        renewing = time.monotonic() - self._last_renewal >= self._renew_every_s
        pipe = self.redis.pipeline(transaction=False)
        for job in running:  # first, so their replies are results[:len(running)]
            pipe.exists(protocol.cancel_key(job.request_id))
        fenced: list[str] = []  # request id of each fenced publish, in pipeline order
        for event in events:
            held = self.held.get(event.request_id)
            if held is None or event.request_id in self.lost:
                continue
            data = protocol.encode_event(event)
            keep_s = protocol.RESULT_TTL_S if isinstance(event, (FinalEvent, ErrorEvent)) else 0
            self._fenced_publish(keys=[self.started_registry.key, held.job.reply_to,
                                       protocol.result_key(event.request_id)],
                                 args=[held.execution.composite_key, data, keep_s], client=pipe)
            fenced.append(event.request_id)
        if renewing:
            self._renew_leases(pipe, running)
        pipe.set(self._batch_key, self.current_batch_size(), ex=self._batch_key_ttl_s)
        self._add_metrics(pipe)
        pipe.llen(self.queue.key)
        results = pipe.execute()
        self._waiting_hint = int(results[-1])
        flags = results[:len(running)]
        refused = {rid for rid, ok in zip(fenced, results[len(running):len(running) + len(fenced)]) if not ok}
        for rid in refused - self.lost:
            log.warning("job %s: lease lost while this worker was stalled; its events were not sent", rid)
        self.lost |= refused
        self._maybe_reap()
        return refused | {job.request_id for job, flag in zip(running, flags) if flag}

    def _maybe_reap(self) -> None:
        """Every few seconds, recover jobs of dead workers (any live worker does it)."""
        if time.monotonic() - self._last_reap < self._reap_every_s:
            return
        self._last_reap = time.monotonic()
        reap_expired(self.redis, self.queue, self.max_attempts)
        reap_stranded(self.redis, self.queue)

    def _add_metrics(self, pipe: redis.client.Pipeline) -> None:
        key = protocol.batch_metrics_key(self.model_id)
        for field, amount in self.take_metric_increments().items():
            if float(amount).is_integer():
                pipe.hincrby(key, field, int(amount))
            else:
                pipe.hincrbyfloat(key, field, amount)

    def _renew_leases(self, pipe: redis.client.Pipeline, running: list[GenerationJob]) -> None:
        """Extend the started-registry expiry of every held job, and the worker's own heartbeat."""
        self._last_renewal = time.monotonic()
        ttl = self.worker.lease_ttl
        for job in running:
            held = self.held.get(job.request_id)
            if held is not None:
                held.execution.heartbeat(self.started_registry, ttl, pipeline=pipe)
        self.worker.heartbeat(self.worker.worker_ttl, pipeline=pipe)

    def finished(self, job: GenerationJob, event: FinalEvent | ErrorEvent | None) -> None:
        held = self.held.pop(job.request_id, None)
        if job.request_id in self.lost:  # another worker owns the job now: leave RQ alone
            self.lost.discard(job.request_id)
            return
        if held is not None:
            retry_redis(lambda: self._finished(held, event), "finish")

    def _finished(self, held: Running, event: FinalEvent | ErrorEvent | None) -> None:
        rq_job, execution = held.rq_job, held.execution
        try:
            if isinstance(event, FinalEvent):
                rq_job.ended_at = now()
                rq_job._result = {"generated_tokens": event.generated_tokens,
                                  "finish_reason": event.finish_reason.value}
                rq_job._status = JobStatus.FINISHED
                self.worker.handle_job_success(rq_job, self.queue, self.started_registry, execution)
            elif isinstance(event, ErrorEvent):
                self._fail_rq(rq_job, execution, f"{event.error_type}: {event.message}")
            else:
                self._cancel_rq(rq_job, execution)
        except redis.ResponseError:
            log.exception("could not record the end of job %s in RQ", rq_job.id)

    def _fail_rq(self, rq_job: Job, execution: Execution, reason: str) -> None:
        rq_job.ended_at = now()
        rq_job._status = JobStatus.FAILED
        self.worker.handle_job_failure(rq_job, self.queue, self.started_registry, exc_string=reason,
                                       execution=execution)

    def _cancel_rq(self, rq_job: Job, execution: Execution) -> None:
        with self.redis.pipeline() as pipe:
            self.worker.cleanup_execution(rq_job, pipeline=pipe, execution=execution)
            rq_job.set_status(JobStatus.CANCELED, pipeline=pipe)
            CanceledJobRegistry(self.queue.name, self.redis, serializer=JSONSerializer).add(rq_job, pipeline=pipe)
            pipe.execute()

    def close(self) -> None:
        """On exit: a job popped by `wait` but never fetched goes back to the head of the queue."""
        def requeue_stash() -> None:
            while self._stash:
                rq_job, _ = self._stash.pop()
                self.redis.lrem(self.queue.intermediate_queue_key, 1, rq_job.id)
                self.queue.enqueue_job(rq_job, at_front=True)
            self.redis.delete(self._batch_key)

        retry_redis(requeue_stash, "close")
