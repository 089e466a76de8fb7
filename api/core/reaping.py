"""The API's share of lease reaping: a worker that dies must not leave its requests waiting.

Workers reap each other's expired leases, but when the last worker of a model dies nobody is left
to do it, and its requests would wait for `--request-timeout`. So each API process also sweeps
RQ's started registry every few seconds (`common.reaper.reap_expired`): a job is re-queued while
it has runs left, else failed with an `incomplete_generation` event that its request answers with.
Claiming is atomic (ZREM), so any number of reapers may sweep together.
"""
from __future__ import annotations

import logging
import threading

import redis
from rq import Queue

from common.reaper import reap_expired
from common.settings import WorkerSettings

log = logging.getLogger(__name__)

# Used only for a job whose worker recorded no `max_attempts`: the workers' default.
DEFAULT_MAX_ATTEMPTS: int = WorkerSettings.max_attempts


class LeaseReaper:
    """A daemon thread (a greenlet under gunicorn's gevent workers) sweeping every `every_s`."""

    def __init__(self, queue: Queue, every_s: float) -> None:
        self.queue = queue
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tgq-reaper", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def sweep(self) -> list[str]:
        return reap_expired(self.queue.connection, self.queue, DEFAULT_MAX_ATTEMPTS)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.sweep()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                log.debug("lease sweep skipped, Redis unreachable: %s", exc)
