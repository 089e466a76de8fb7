"""RQ's job state transitions for many jobs at once, written into one pipeline.

RQ's own worker records each transition with its own round trips (prepare the execution, mark the
job started, then success or failure handling: about a dozen per job). A batch that admits or
retires 32 jobs in one step would pay hundreds. The same Redis writes are made here, for every
job of a step, into one pipeline that the caller executes once, so the worker's round trips per
step do not grow with the batch. tgq jobs have no dependents, repeats, retries or rate limits,
which is what lets these writes skip RQ's WATCH loops.
"""
from __future__ import annotations

from typing import Any

from redis.client import Pipeline
from rq import Queue, SimpleWorker
from rq.executions import Execution, cleanup_execution
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import now

from common.reaper import record_failure

# Move up to ARGV[1] job ids from the queue to RQ's intermediate queue, as RQ's dequeue does, and
# describe each: its job hash and whether its request was cancelled while it waited. Ids popped
# earlier by a blocking wait (ARGV[4..]) are described too, but only if they are still in the
# intermediate queue (a reaper may have handed them back while this worker was stopped). Ids whose
# job hash is gone (expired) are dropped. Returns {descriptions, queue length after}.
# KEYS: queue, intermediate queue. ARGV: count, job key prefix, cancel key prefix, earlier ids...
TAKE_JOBS = """
local taken = {}
local function describe(id)
  local fields = redis.call('HGETALL', ARGV[2] .. id)
  if #fields == 0 then
    redis.call('LREM', KEYS[2], 1, id)
    return
  end
  taken[#taken + 1] = {id, redis.call('EXISTS', ARGV[3] .. id), fields}
end
for i = 4, #ARGV do
  if redis.call('LPOS', KEYS[2], ARGV[i]) then describe(ARGV[i]) end
end
for _ = 1, tonumber(ARGV[1]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then break end
  describe(id)
end
return {taken, redis.call('LLEN', KEYS[1])}
"""


def restore_job(job_id: str, fields: list[Any], queue: Queue) -> Job:
    """An RQ Job from the flat HGETALL reply the TAKE_JOBS script returns."""
    job = Job(job_id, connection=queue.connection, serializer=JSONSerializer)
    job.restore(dict(zip(fields[::2], fields[1::2])))
    return job


def mark_started(pipe: Pipeline, worker: SimpleWorker, queue: Queue, job: Job, lease_ttl: int) -> Execution:
    """What RQ's prepare_execution + prepare_job_execution write: the job is running, leased for lease_ttl s."""
    execution = Execution.create(job, lease_ttl, pipeline=pipe, worker_name=worker.name)
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
