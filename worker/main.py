"""`tgq worker`: load the model once, register with RQ, run the batching engine until told to stop.

SIGTERM/SIGINT: stop taking jobs, finish (or hand back) the running batch within the grace
period, deregister, exit 0. A second signal exits at once; the reaper re-queues the batch.

`--load-test-tokens-per-s R` (LOAD TESTING ONLY): no torch, no model; worker/loadtest.py emits
placeholder tokens at R per row through the same Redis/RQ wiring.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
from typing import Any, Callable

from rq import Queue
from rq.serializers import JSONSerializer

from common import model_files, protocol
from common.redis_client import connect, count_round_trips
from common.settings import LimitSettings, ModelSettings, RedisSettings, SettingsError, WorkerSettings

log = logging.getLogger("tgq.worker")


class StopFlag:
    """Set by signals; the engine polls it between steps."""

    def __init__(self) -> None:
        self.requested_at: float | None = None

    def __call__(self) -> bool:
        return self.requested_at is not None

    def install(self) -> None:
        def handler(signum: int, _frame: object) -> None:
            if self.requested_at is None:
                log.info("signal %d: finishing the running batch, then exiting", signum)
                self.requested_at = time.monotonic()
            else:
                log.info("signal %d again: exiting now; the reaper re-queues the batch", signum)
                os._exit(1)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def run_worker(redis_settings: RedisSettings, model_settings: ModelSettings, limits: LimitSettings,
               settings: WorkerSettings) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = StopFlag()
    stop.install()
    load_test = settings.load_test_tokens_per_s > 0
    # Finds (a Hub model: downloads) the files, loads nothing; a load test needs no weights.
    source = model_files.resolve(model_settings.model, model_settings.model_id, weights=not load_test)
    if load_test:
        from .loadtest import LoadTestLoop  # no torch, no model

        rate = settings.load_test_tokens_per_s
        log.warning("LOAD-TEST MODE: no model, placeholder tokens (%g tokens/s per row, queue of %s)",
                    rate, source.model_id)
        make_loop: Callable[[Any, Any], Any] = (
            lambda io, metrics: LoadTestLoop(rate, settings.max_batch_size, io, io, metrics))
    else:
        from .engine import Engine
        from .model import load_model

        started = time.monotonic()
        loaded = load_model(source, model_settings.cache_dir, settings.device, settings.dtype, settings.threads,
                            rows_hint=settings.max_batch_size, fused=settings.fused_forward,
                            cuda_graphs=settings.cuda_graphs, cpu_kernels=settings.cpu_kernels)
        log.info("model %s loaded in %.1f s (%s, %s)", source.model_id, time.monotonic() - started,
                 settings.device, settings.dtype)
        make_loop = lambda io, metrics: Engine(loaded, settings, limits, io, io, metrics)  # noqa: E731
    return _serve(redis_settings, settings, source.model_id, make_loop, stop)


def _serve(redis_settings: RedisSettings, settings: WorkerSettings, model_id: str,
           make_loop: Callable[[Any, Any], Any], stop: StopFlag) -> int:
    """Register with RQ and run `make_loop(io, metrics)` (the engine, or the load-test loop) until stopped."""
    from .metrics import EngineMetrics
    from .pipelined import PipelinedJobs
    from .rq_worker import BatchWorker, RedisJobs, retry_redis

    connection = connect(redis_settings)
    round_trips = count_round_trips(connection)
    queue = Queue(protocol.queue_name(model_id), connection=connection, serializer=JSONSerializer)
    name = settings.name or f"{socket.gethostname()}.{os.getpid()}"
    # A short worker TTL so `rq info` forgets a dead worker quickly; it is renewed every second.
    rq_worker = BatchWorker([queue], connection=connection, name=name, serializer=JSONSerializer,
                            worker_ttl=max(30, 2 * settings.lease_ttl))
    rq_worker.lease_ttl = settings.lease_ttl
    metrics = EngineMetrics(max_batch_size=settings.max_batch_size, model=model_id)
    if settings.metrics_port:  # before registering: a port that is taken stops the worker with one line
        from prometheus_client import start_http_server

        try:
            start_http_server(settings.metrics_port, registry=metrics.registry)
        except OSError as exc:
            raise SettingsError(f"--metrics-port {settings.metrics_port}: {exc.strerror or exc}") from None
        log.info("worker metrics on :%d/metrics", settings.metrics_port)
    retry_redis(rq_worker.register_birth, "register")
    jobs = RedisJobs(connection, rq_worker, queue, model_id, max_attempts=settings.max_attempts,
                     capacity=settings.max_batch_size, orphan_grace_s=settings.orphan_grace_s)
    metrics.round_trips = round_trips
    jobs.take_metric_increments = metrics.take_increments
    jobs.current_batch_size = lambda: metrics.current_size

    io = PipelinedJobs(jobs)
    loop = make_loop(io, metrics)
    log.info("worker %s listening on %s (max batch %d)", name, queue.name, settings.max_batch_size)
    try:
        loop.run(should_stop=stop, grace_s=settings.grace_period)
    finally:
        io.close()
        rq_worker.register_death()
        log.info("worker %s stopped", name)
    return 0
