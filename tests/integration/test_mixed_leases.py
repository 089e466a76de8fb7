"""Leases in a fleet one release apart: neither release's reaper re-runs the other's live jobs, and each
still reaps the other's jobs once their worker is dead (real processes, real Redis, real RQ).

The previous release is the code of `PREVIOUS` (the last commit with one reply message per event and
RQ's per-job heartbeats), taken out of this clone's history with `git archive` and run from its own
directory. Its reaper is the same function as today's; what changed is how a worker keeps its leases
(one `ZADD XX` over the batch instead of RQ's heartbeat per job), and this shows both ways still meet."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from rq import Queue
from rq.job import Job
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from api.core.queue import JobQueue
from api.core.replies import ReplyHub
from common import protocol
from common.reaper import reap_expired
from common.schemas import FinalEvent, GenerationJob, SamplingParams, StoppingParams
from tests.integration.conftest import MODEL_ID
from tests.integration.faults import wait_for
from tests.support import v1_codec
from tests.support.processes import TgqProcess, start_worker, wait_worker_ready

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PREVIOUS = "80b577c"
LEASE_TTL = 2
NEW_TOKENS = 2500
WORKER_LIMITS = ("--lease-ttl", str(LEASE_TTL), "--max-batch-size", "4", "--max-input-length", "64",
                 "--max-total-tokens", "4096", "--max-batch-total-tokens", "20000", "--model-id", MODEL_ID)

OLD_REAPER = """
import json, sys, time
import redis
from rq import Queue
from rq.serializers import JSONSerializer
import common
from common import protocol
from common.reaper import reap_expired
url, stop_key, until_one = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
conn = redis.Redis.from_url(url)
queue = Queue(protocol.queue_name("%s"), connection=conn, serializer=JSONSerializer)
handled, deadline = [], time.time() + 120
while time.time() < deadline and not conn.exists(stop_key) and not (until_one and handled):
    handled += reap_expired(conn, queue, 3)
    time.sleep(0.1)
print(json.dumps({"code": common.__file__, "handled": handled}))
""" % MODEL_ID


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory) -> Path:
    try:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS, "common", "worker", "api"],
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"the previous release {PREVIOUS} is not in this clone's history ({exc})")
    where = tmp_path_factory.mktemp("previous-release")
    tarfile.open(fileobj=io.BytesIO(tar)).extractall(where)
    return where


def long_job(reply_to: str) -> GenerationJob:
    return GenerationJob(request_id=uuid.uuid4().hex, input_ids=(1, 2, 3), sampling=SamplingParams(seed=7),
                         stopping=StoppingParams(max_new_tokens=NEW_TOKENS), reply_to=reply_to, enqueued_at=time.time())


def model_queue(conn) -> Queue:
    return Queue(protocol.queue_name(MODEL_ID), connection=conn, serializer=JSONSerializer)


def started(conn) -> set[str]:
    return set(StartedJobRegistry(queue=model_queue(conn)).get_job_ids())


class OldReaper:
    """The previous release's `reap_expired`, looping in its own process until told to stop (or, with
    `until_one`, until it has handled a job)."""

    def __init__(self, old: Path, redis_url: str, until_one: bool = False) -> None:
        self.stop_key = f"test:stop-reaper:{uuid.uuid4().hex}"
        self.url = redis_url
        self.old = old
        self.until_one = until_one
        self.proc = subprocess.Popen([sys.executable, "-c", OLD_REAPER, redis_url, self.stop_key,
                                      "1" if until_one else "0"], cwd=old, env={"PYTHONPATH": str(old),
                                      "PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def result(self, conn) -> list[str]:
        if not self.until_one:
            conn.set(self.stop_key, 1, ex=60)
        out, err = self.proc.communicate(timeout=150)
        assert self.proc.returncode == 0, err.decode()[-3000:]
        res = json.loads(out.decode().strip().splitlines()[-1])
        assert res["code"].startswith(str(self.old)), res  # the previous release's code, not this checkout's
        return res["handled"]


def collect(q, ids: list[str], timeout: float = 120) -> dict[str, list]:
    """Every event of `ids` until each has its final one."""
    events: dict[str, list] = {rid: [] for rid in ids}
    pending, deadline = set(ids), time.monotonic() + timeout
    while pending:
        assert time.monotonic() < deadline, f"no final event for {pending}"
        event = q.get(timeout=deadline - time.monotonic())
        events[event.request_id].append(event)
        if isinstance(event, FinalEvent):
            pending.discard(event.request_id)
    return events


def assert_one_clean_run(events: dict[str, list]) -> None:
    for rid, evs in events.items():
        assert {e.attempt for e in evs} == {0}, f"{rid} was re-run"
        assert [e.index for e in evs] == list(range(len(evs))), f"{rid}: holes or repeats"
        assert evs[-1].generated_tokens == len(evs)


def test_an_old_reaper_leaves_a_new_workers_live_jobs_alone(redis_server, conn, tiny_model_dir, previous_release):
    conn.flushall()
    worker = start_worker(redis_server.url, tiny_model_dir, *WORKER_LIMITS)
    hub = ReplyHub(conn)
    try:
        wait_worker_ready(conn, [worker])
        jobs = [long_job(hub.channel) for _ in range(3)]
        ids = [j.request_id for j in jobs]
        q = hub.register(ids)
        reaper = OldReaper(previous_release, redis_server.url)
        began = time.monotonic()
        JobQueue(conn, MODEL_ID, job_timeout_s=600).enqueue(jobs)
        events = collect(q, ids)
        ran = time.monotonic() - began
        handled = reaper.result(conn)
        assert handled == []
        assert ran > 2 * LEASE_TTL, f"the jobs took {ran:.1f} s: too short to need a renewed lease"
        assert_one_clean_run(events)
        wait_for(lambda: set(ids) <= set(FinishedJobRegistry(queue=model_queue(conn)).get_job_ids()), 10,
                 "the jobs in RQ's finished registry")

        # The same old reaper does reap a new worker's job once that worker is dead.
        job = long_job(hub.channel)
        hub.register([job.request_id])
        JobQueue(conn, MODEL_ID, job_timeout_s=600).enqueue([job])
        wait_for(lambda: job.request_id in started(conn), 30, "the job to start")
        worker.kill_group()
        assert OldReaper(previous_release, redis_server.url, until_one=True).result(conn) == [job.request_id]
        assert Job.fetch(job.request_id, connection=conn, serializer=JSONSerializer).meta["attempt"] == 1
        assert job.request_id in model_queue(conn).get_job_ids()
    finally:
        hub.close()
        worker.stop()


def test_a_new_reaper_leaves_an_old_workers_live_jobs_alone(redis_server, conn, tiny_model_dir, previous_release):
    conn.flushall()
    worker = TgqProcess(["worker", "--redis-url", redis_server.url, "--model", tiny_model_dir, "--dtype", "fp32",
                         "--threads", "1", "--name", f"old-{uuid.uuid4().hex[:6]}", *WORKER_LIMITS],
                        env={"PYTHONPATH": str(previous_release)}, cwd=previous_release)
    hub = ReplyHub(conn)
    handled: list[str] = []
    stop = threading.Event()

    def reap() -> None:  # this release's reaper, as a new API process or worker runs it
        while not stop.is_set():
            handled.extend(reap_expired(conn, model_queue(conn), 3))
            time.sleep(0.1)

    reaper = threading.Thread(target=reap, daemon=True)
    try:
        wait_worker_ready(conn, [worker])
        # Run from the previous release's directory, which `-m` puts first on sys.path (the old
        # reaper above checks the same mechanism through `common.__file__`).
        assert Path(f"/proc/{worker.proc.pid}/cwd").resolve() == previous_release.resolve()
        jobs = [long_job(hub.channel) for _ in range(3)]
        ids = [j.request_id for j in jobs]
        q = hub.register(ids)
        queue = model_queue(conn)
        reaper.start()
        began = time.monotonic()
        for job in jobs:  # as the previous release's API enqueues: no "v"
            queue.enqueue_call(func=protocol.JOB_FUNC, args=[v1_codec.job_dict(job)], job_id=job.request_id)
        events = collect(q, ids)
        ran = time.monotonic() - began
        assert handled == []
        assert ran > 2 * LEASE_TTL, f"the jobs took {ran:.1f} s: too short to need a renewed lease"
        assert_one_clean_run(events)

        # ... and reaps an old worker's job once that worker is dead.
        job = long_job(hub.channel)
        hub.register([job.request_id])
        queue.enqueue_call(func=protocol.JOB_FUNC, args=[v1_codec.job_dict(job)], job_id=job.request_id)
        wait_for(lambda: job.request_id in started(conn), 30, "the job to start")
        worker.kill_group()
        wait_for(lambda: handled == [job.request_id], 4 * LEASE_TTL + 10, "the dead old worker's job reaped")
        assert Job.fetch(job.request_id, connection=conn, serializer=JSONSerializer).meta["attempt"] == 1
    finally:
        stop.set()
        hub.close()
        worker.stop()
