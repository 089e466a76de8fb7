"""RQ's job state transitions for many jobs at once, written into one pipeline.

RQ's own worker records each transition with its own round trips (prepare the execution, mark the
job started, then success or failure handling: about a dozen per job). A batch that admits or
retires 32 jobs in one step would pay hundreds. The same Redis writes are made here, for every
job of a step, into one pipeline that the caller executes once, so the worker's round trips per
step do not grow with the batch. tgq jobs have no dependents, repeats, retries or rate limits,
which is what lets these writes skip RQ's WATCH loops.

Taking jobs is the one transition that spans two round trips (take them off the queue, then mark
them started), so it is fenced: the take claims each job for the worker, and the writes that start
it apply only while that claim holds (ClaimedWrites). The reaper's rescue of a job left between
the two ends the claim in the same transaction (`common.reaper.reap_stranded`).
"""
from __future__ import annotations

import time
from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq import Queue, SimpleWorker
from rq.executions import Execution, cleanup_execution
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import now

from common import protocol
from common.reaper import record_failure

# Move up to ARGV[1] job ids from the queue to RQ's intermediate queue, as RQ's dequeue does, claim
# each for this worker (ARGV[5], for ARGV[6] s) and describe it: its job hash and whether its request
# was cancelled while it waited. Ids popped earlier by a blocking wait (ARGV[7..]) are taken too, but
# only if they are still in the intermediate queue and nobody else claimed them (a reaper may have
# handed them back, and another worker taken them, while this worker was stopped; a take whose start
# failed on a Redis error leaves them claimed by this worker). Ids whose job hash is
# gone (expired) are dropped, and so is a queue entry for a job another worker holds a claim on (a
# duplicate). Returns {descriptions, queue length after}.
# KEYS: queue, intermediate queue. ARGV: count, job key prefix, cancel key prefix, claim key prefix,
# worker name, claim ttl, earlier ids...
TAKE_JOBS = """
local taken = {}
local function take(id, popped_now)
  local fields = redis.call('HGETALL', ARGV[2] .. id)
  if #fields == 0 then
    redis.call('LREM', KEYS[2], -1, id)
    return
  end
  local claim = ARGV[4] .. id
  if not redis.call('SET', claim, ARGV[5], 'NX', 'EX', ARGV[6]) then
    if popped_now then
      redis.call('LREM', KEYS[2], -1, id)
      return
    end
    if redis.call('GET', claim) ~= ARGV[5] then return end
  end
  taken[#taken + 1] = {id, redis.call('EXISTS', ARGV[3] .. id), fields}
end
for i = 7, #ARGV do
  if redis.call('LPOS', KEYS[2], ARGV[i]) then take(ARGV[i], false) end
end
for _ = 1, tonumber(ARGV[1]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then break end
  take(id, true)
end
return {taken, redis.call('LLEN', KEYS[1])}
"""

# Apply each job's recorded writes only if this worker's claim on the job (from TAKE_JOBS) still
# holds, and end the claim. A worker stopped between taking jobs and marking them started (SIGSTOP,
# a stalled host) may find that a reaper put them back on the queue meanwhile, and another worker
# ran them: its writes would mark a finished job started again and run it twice.
# KEYS: one claim key per job. ARGV: worker name, then per job the number of commands and per
# command its argument count and arguments. Returns 1 per job written, 0 per job refused.
CLAIMED_WRITES = """
local done, at = {}, 2
for i = 1, #KEYS do
  local mine = redis.call('GET', KEYS[i]) == ARGV[1]
  local commands = tonumber(ARGV[at])
  at = at + 1
  for _ = 1, commands do
    local argc = tonumber(ARGV[at])
    if mine then redis.call(unpack(ARGV, at + 1, at + argc)) end
    at = at + 1 + argc
  end
  if mine then redis.call('DEL', KEYS[i]) end
  done[i] = mine and 1 or 0
end
return done
"""


class ClaimedWrites:
    """RQ's writes for several claimed jobs, recorded per job and sent as one CLAIMED_WRITES call."""

    def __init__(self, connection: Redis, worker_name: str) -> None:
        self.connection = connection
        self.worker_name = worker_name
        self.job_ids: list[str] = []
        self._recorders: list[Pipeline] = []

    def for_job(self, job_id: str) -> Pipeline:
        """A pipeline that only records: the writes queued on it apply if the claim on `job_id` holds."""
        recorder = self.connection.pipeline(transaction=False)
        self.job_ids.append(job_id)
        self._recorders.append(recorder)
        return recorder

    def script_call(self) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV for CLAIMED_WRITES."""
        args: list[Any] = [self.worker_name]
        for recorder in self._recorders:
            args.append(len(recorder.command_stack))
            for command, _options in recorder.command_stack:
                args += [len(command), *command]
            recorder.reset()
        return [protocol.claim_key(job_id) for job_id in self.job_ids], args


def restore_job(job_id: str, fields: list[Any], queue: Queue) -> Job:
    """An RQ Job from the flat HGETALL reply the TAKE_JOBS script returns."""
    job = Job(job_id, connection=queue.connection, serializer=JSONSerializer)
    job.restore(dict(zip(fields[::2], fields[1::2])))
    return job


def mark_started(pipe: Pipeline, worker: SimpleWorker, queue: Queue, job: Job, lease_ttl: int) -> Execution:
    """What RQ's prepare_execution + prepare_job_execution write: the job is running, leased for lease_ttl s.

    The lease is only the started-registry entry's score (now + lease_ttl), which the worker renews
    for its whole batch in one ZADD. The execution's own hash and registry entry are written to live
    for protocol.EXECUTION_TTL_S instead of being renewed with it (RQ's per-job heartbeat costs five
    commands per job); they are deleted when the job ends, and outlive a dead worker by that long."""
    execution = Execution.create(job, protocol.EXECUTION_TTL_S, pipeline=pipe, worker_name=worker.name)
    pipe.zadd(job.started_job_registry.key, {execution.composite_key: time.time() + lease_ttl})
    worker.executions[execution.id] = execution
    pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
    job.prepare_for_execution(worker.name, pipeline=pipe)
    pipe.persist(job.key)
    pipe.lrem(queue.intermediate_queue_key, 1, job.id)
    return execution


def mark_canceled(pipe: Pipeline, worker: SimpleWorker, queue: Queue, job: Job,
                  execution: Execution | None) -> None:
    """The job ends in RQ's canceled registry (its client left); `execution` None: it never started."""
    if execution is not None:
        cleanup_execution(worker, job, pipe, execution)
    else:
        pipe.lrem(queue.intermediate_queue_key, 1, job.id)
    job.set_status(JobStatus.CANCELED, pipeline=pipe)
    CanceledJobRegistry(queue.name, queue.connection, serializer=JSONSerializer).add(job, pipeline=pipe)


def mark_succeeded(pipe: Pipeline, worker: SimpleWorker, job: Job, execution: Execution,
                   result: dict[str, Any]) -> None:
    """What RQ's handle_job_success writes for a job without dependents or repeats."""
    job.ended_at = now()
    job._result = result
    result_ttl = job.get_result_ttl(worker.default_result_ttl)
    worker.increment_successful_job_count(pipeline=pipe)
    worker.increment_total_working_time(job.ended_at - (job.started_at or job.ended_at), pipe)
    if result_ttl != 0:
        job._handle_success(result_ttl, pipeline=pipe, worker_name=worker.name, execution_id=execution.id,
                            execution_started_at=execution.created_at, execution_ended_at=job.ended_at)
    job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
    job._status = JobStatus.FINISHED
    cleanup_execution(worker, job, pipe, execution)


def mark_failed(pipe: Pipeline, worker: SimpleWorker, queue: Queue, job: Job, execution: Execution | None,
                reason: str) -> None:
    """What RQ's handle_job_failure writes for a job that is not retried; `execution` None: never started."""
    job.ended_at = now()
    if execution is None:
        pipe.lrem(queue.intermediate_queue_key, 1, job.id)
        record_failure(pipe, queue, job, reason)
    else:
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        cleanup_execution(worker, job, pipe, execution)
        job._handle_failure(reason, pipeline=pipe, worker_name=worker.name, execution_id=execution.id,
                            execution_started_at=execution.created_at, execution_ended_at=job.ended_at)
        worker.increment_failed_job_count(pipe)
        if job.started_at:
            worker.increment_total_working_time(job.ended_at - job.started_at, pipe)
