"""Security: nothing pickled or evaluated anywhere; Redis password and TLS through the URL."""
from __future__ import annotations

import os
import pickletools
import re
import zlib
from pathlib import Path

import orjson
import pytest
import redis
import requests
from rq import Queue
from rq.job import JobStatus

from common import protocol
from tests.support.redis_server import RedisServer, make_tls_files, supports_tls

from .conftest import MODEL_ID, make_stack
from .faults import rq_queue, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


# ---- nothing pickled in Redis -------------------------------------------------------------

def looks_pickled(value: bytes) -> bool:
    """A pickle (protocol 2+, what RQ's default serializer writes): the PROTO header, and an opcode
    stream that parses up to a STOP at the very end (parsed with pickletools, never loaded)."""
    if len(value) < 3 or value[0] != 0x80 or value[1] not in range(2, 6):
        return False
    try:
        last = None
        for op, _, pos in pickletools.genops(value):
            last = (op.name, pos)
        return last is not None and last[0] == "STOP" and last[1] == len(value) - 1
    except ValueError:
        return False


def values_of(client: redis.Redis, key: bytes) -> list[bytes]:
    kind = client.type(key).decode()
    if kind == "string":
        return [client.get(key) or b""]
    if kind == "hash":
        return list(client.hgetall(key).values())
    if kind == "list":
        return client.lrange(key, 0, -1)
    if kind == "set":
        return list(client.smembers(key))
    if kind == "zset":
        return client.zrange(key, 0, -1)
    if kind == "stream":
        return [v for _, fields in client.xrange(key) for v in fields.values()]
    return []


def scan_for_pickles(client: redis.Redis) -> tuple[int, list[str]]:
    """(values looked at, keys holding a pickle), looking inside zlib-compressed values too."""
    seen, bad = 0, []
    for key in client.scan_iter(count=1000):
        for value in values_of(client, key):
            seen += 1
            candidates = [value]
            try:
                candidates.append(zlib.decompress(value))
            except zlib.error:
                pass
            if any(looks_pickled(c) for c in candidates):
                bad.append(key.decode())
    return seen, bad


def test_the_detector_sees_a_pickle():
    import pickle  # only to build a sample for the detector

    sample = pickle.dumps(("worker.rq_worker.generate", None, [{"a": 1}], {}), protocol=pickle.HIGHEST_PROTOCOL)
    assert looks_pickled(sample) and looks_pickled(zlib.decompress(zlib.compress(sample))) is True
    assert not looks_pickled(orjson.dumps({"a": 1})) and not looks_pickled(b"\x80")


def test_nothing_in_redis_is_pickled_during_a_run(stack):
    client = stack.redis
    url = stack.url
    body = {"inputs": "scan me", "parameters": {"max_new_tokens": 8, "details": True}}
    assert requests.post(url + "/generate", json=body, timeout=30).status_code == 200
    assert requests.post(url + "/generate", json={**body, "parameters": {"best_of": 2, "do_sample": True,
                                                                           "max_new_tokens": 4}},
                         timeout=30).status_code == 200
    with requests.post(url + "/generate_stream", json=body, stream=True, timeout=30) as resp:
        assert b"generated_text" in resp.content
    with pytest.raises(requests.exceptions.ReadTimeout):  # a cancelled job too
        requests.post(url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1400}},
                      timeout=(5, 0.5))
    assert requests.get(url + "/health", timeout=30).status_code == 200
    queue = rq_queue(client)
    wait_for(lambda: queue.canceled_job_registry.get_job_ids(), 10, "the cancelled job")
    seen, bad = scan_for_pickles(client)
    assert seen > 20 and bad == []
    # and every job's payload is JSON (RQ compresses the field)
    for rid in queue.finished_job_registry.get_job_ids():
        func, _, args, _ = orjson.loads(zlib.decompress(client.hget(f"rq:job:{rid}", "data")))
        assert func == protocol.JOB_FUNC and isinstance(args[0]["input_ids"], list)


# ---- nothing evaluated -----------------------------------------------------------------------

FORBIDDEN = [
    (r"^\s*(import|from)\s+(pickle|cPickle|_pickle|dill|cloudpickle|marshal|shelve|joblib)\b", "a pickle module"),
    (r"(?<![.\w])(eval|exec|compile)\s*\(", "eval/exec/compile"),
    (r"__import__\s*\(|importlib\.import_module|\bimport_string\b", "importing by name"),
    (r"yaml\.(unsafe_)?load\s*\((?![^)]*SafeLoader)", "yaml.load without SafeLoader"),
    (r"torch\.load\s*\((?![^)]*weights_only\s*=\s*True)", "torch.load that may unpickle"),
    (r"trust_remote_code\s*=\s*True", "remote model code"),
    (r"\.perform\s*\(|\.func\b(?!_name)|\.execute_job\s*\(|\.work\s*\(", "letting RQ call a job's function"),
    (r"(?<![\w.])pickle\.", "pickle"),
    (r"serializer\s*=\s*(?!JSONSerializer\b)\w", "an RQ serializer other than JSON"),
]


def test_the_code_never_unpickles_or_evaluates():
    offenders = []
    for package in ("api", "common", "worker"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                for pattern, what in FORBIDDEN:
                    if re.search(pattern, line):
                        offenders.append(f"{path.relative_to(ROOT)}:{n}: {what}: {line.strip()}")
    assert offenders == []


def test_a_pickled_job_is_never_unpickled_by_the_worker(stack, tmp_path):
    """Someone with Redis access enqueues, with RQ's default (pickle) serializer, a job whose
    payload runs a command when unpickled. The worker must fail it without running anything."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil_queue = Queue(protocol.queue_name(MODEL_ID), connection=stack.redis)  # pickle serializer
    evil = evil_queue.enqueue_call(func=protocol.JOB_FUNC, args=[Exploit()], job_id="evil-job")
    assert looks_pickled(zlib.decompress(stack.redis.hget(evil.key, "data")))
    failed = rq_queue(stack.redis).failed_job_registry
    wait_for(lambda: "evil-job" in failed.get_job_ids(), 20, "the worker to fail the pickled job")
    assert not marker.exists()
    job = rq_queue(stack.redis).fetch_job("evil-job")
    assert job.get_status() == JobStatus.FAILED
    assert "invalid job payload" in job.latest_result().exc_string
    assert all(w.alive() for w in stack.workers)
    ok = requests.post(stack.url + "/generate", json={"inputs": "still fine", "parameters": {"max_new_tokens": 3}},
                       timeout=30)
    assert ok.status_code == 200


# ---- Redis password and TLS ------------------------------------------------------------------

def run_stack_on(server: RedisServer, model: str) -> None:
    stack = make_stack(server.url, model)
    try:
        resp = requests.post(stack.url + "/generate", json={"inputs": "secret", "parameters": {
            "max_new_tokens": 3}}, timeout=30)
        assert resp.status_code == 200, resp.text
        with requests.post(stack.url + "/generate_stream", json={"inputs": "secret", "parameters": {
                "max_new_tokens": 3}}, stream=True, timeout=30) as streamed:
            assert b'"generated_text":"' in streamed.content
    finally:
        stack.stop()


def test_redis_password_in_the_url(tiny_model_dir):
    server = RedisServer(password="s3cret-pw").start()
    try:
        bare = redis.Redis(host="127.0.0.1", port=server.port)
        with pytest.raises(redis.exceptions.AuthenticationError):
            bare.ping()  # the server really requires it
        run_stack_on(server, tiny_model_dir)
        # a wrong password is a clean 503, not a crash
        wrong = RedisServer(port=server.port, password="nope")
        stack = make_stack(wrong.url, tiny_model_dir, workers=0)
        try:
            resp = requests.post(stack.url + "/generate", json={"inputs": "x"}, timeout=30)
            assert resp.status_code == 503 and resp.json()["error_type"] == "unavailable"
        finally:
            stack.stop()
    finally:
        server.cleanup()


@pytest.mark.skipif(not supports_tls(), reason="this redis-server was built without TLS (no --tls-port)")
def test_redis_tls_through_rediss_url(tiny_model_dir, tmp_path):
    tls = make_tls_files(tmp_path)
    server = RedisServer(password="tls-pw", tls_dir=tls).start()
    try:
        with pytest.raises(redis.exceptions.ConnectionError):  # plaintext is refused
            redis.Redis(host="127.0.0.1", port=server.port, password="tls-pw", socket_timeout=3).ping()
        assert server.url.startswith("rediss://")
        run_stack_on(server, tiny_model_dir)
    finally:
        server.cleanup()
