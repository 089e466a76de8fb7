"""The RQ side of a request: the 429 check against the shared queue, enqueue, cancel.

The queue length lives in Redis, so every API replica agrees on when the model is overloaded.
Jobs carry only JSON (RQ's JSONSerializer): `args=[GenerationJob.to_dict()]`, job id = request id.
"""
from __future__ import annotations

import time
import uuid
from typing import Sequence

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from common import protocol
from common.errors import Overloaded
from common.schemas import GenerationJob


class JobQueue:
    def __init__(self, client: redis.Redis, model_id: str, *, job_timeout_s: float) -> None:
        self.redis = client
        self.model_id = model_id
        self.queue = Queue(protocol.queue_name(model_id), connection=client, serializer=JSONSerializer)
        self.job_timeout_s = max(1, int(job_timeout_s))

    @property
    def key(self) -> str:
        """The Redis list RQ keeps the waiting job ids in."""
        return str(self.queue.key)

    def waiting(self) -> int:
        """Jobs enqueued and not yet taken by a worker (one LLEN)."""
        return int(self.queue.count)

    def check_capacity(self, copies: int, max_queue_length: int) -> None:
        """Raise Overloaded unless `copies` more jobs fit under `max_queue_length` waiting jobs.

        Check-then-enqueue is not atomic across replicas: under a burst the queue can overshoot
        the limit by at most the number of concurrent enqueuers, never by a backlog.
        """
        if self.waiting() + copies > max_queue_length:
            self._record_overload()
            raise Overloaded()

    def _record_overload(self) -> None:
        """Note this 429 for `tgq status` (the last minute's count); costs only refused requests."""
        key, now = protocol.overloaded_key(self.model_id), time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(key, {uuid.uuid4().hex: now})
        pipe.zremrangebyscore(key, 0, now - protocol.OVERLOAD_WINDOW_S)
        pipe.expire(key, 2 * protocol.OVERLOAD_WINDOW_S)
        pipe.execute()

    def enqueue(self, jobs: Sequence[GenerationJob]) -> None:
        for job in jobs:
            self.queue.enqueue_call(func=protocol.JOB_FUNC, args=[job.to_dict()], job_id=job.request_id,
                                    result_ttl=protocol.RESULT_TTL_S, failure_ttl=protocol.RESULT_TTL_S,
                                    timeout=self.job_timeout_s)

    def cancel(self, request_ids: Sequence[str]) -> None:
        """Flag jobs as cancelled; workers read the flags once per step and drop the rows."""
        if not request_ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for rid in request_ids:
            pipe.set(protocol.cancel_key(rid), b"1", ex=protocol.CANCEL_TTL_S)
        pipe.execute()

    def stored_result(self, request_id: str) -> bytes | None:
        """The final (or error) event a worker stored for late readers, if any."""
        value = self.redis.get(protocol.result_key(request_id))
        return value if isinstance(value, bytes) or value is None else str(value).encode()
