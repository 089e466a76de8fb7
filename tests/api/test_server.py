"""`run_api` for real: gunicorn with two gevent workers, real HTTP, metrics merged across processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis
import requests
from rq import Queue
from rq.serializers import JSONSerializer

from common import protocol
from common.schemas import GenerationJob, TokenEvent
from tests.support.metrics import sample
from tests.support.redis_server import free_port

from .conftest import final_for, tok

ROOT = Path(__file__).resolve().parents[2]

LAUNCH = """
import sys
from api.server import run_api
from common.settings import ApiSettings, LimitSettings, RedisSettings, ServedModelsSettings
sys.exit(run_api(RedisSettings(sys.argv[1]), ServedModelsSettings(model=(sys.argv[2],)),
                 LimitSettings(max_input_length=32, max_total_tokens=64, max_queue_length=8),
                 ApiSettings(host="127.0.0.1", port=int(sys.argv[3]), workers=2, request_timeout=10)))
"""


@pytest.fixture(scope="module")
def server(redis_server, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One gunicorn for this module (starting one takes a couple of seconds)."""
    redis_url = redis_server.url
    redis.Redis.from_url(redis_url).flushall()
    port = free_port()
    metrics_dir = tmp_path_factory.mktemp("prom")
    (metrics_dir / "stale_counter_1.db").write_bytes(b"old")  # must be wiped at start
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, redis_url, str(model_dir), str(port)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(base + "/metrics", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read().decode() if proc.stdout else ""
            proc.kill()
            pytest.fail(f"the API did not start:\n{out}")
        time.sleep(0.1)
    yield base
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _pop(r: redis.Redis) -> GenerationJob:
    q = Queue(protocol.queue_name("tiny-model0"), connection=r, serializer=JSONSerializer)
    found = Queue.dequeue_any([q], timeout=5, connection=r, serializer=JSONSerializer)
    assert found is not None
    return GenerationJob.from_dict(found[0].args[0])


def _scrape(server: str) -> str:
    return requests.get(server + "/metrics", headers={"Connection": "close"}, timeout=5).text


def test_gunicorn_end_to_end(server: str, redis_server) -> None:
    r = redis.Redis.from_url(redis_server.url)
    # metrics from both worker processes are merged at every scrape
    before = _scrape(server)
    for _ in range(12):
        resp = requests.post(server + "/generate", json={"inputs": "hello", "parameters": {"top_k": 0}},
                             headers={"Connection": "close"}, timeout=5)
        assert resp.status_code == 422
    for _ in range(4):
        text = _scrape(server)
        assert sample(text, "tgi_request_count") - sample(before, "tgi_request_count") == 12
        failures = 'tgi_request_failure{err="validation"}'
        assert sample(text, failures) - sample(before, failures) == 12

    # a stream over real HTTP: headers arrive before any token, events are framed as TGI's
    with requests.post(server + "/generate_stream", json={"inputs": "hello", "parameters": {"details": True}},
                       stream=True, timeout=10) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"] == "text/event-stream"
        job = _pop(r)
        r.publish(job.reply_to, protocol.encode_event(TokenEvent(job.request_id, 0, 0, tok(5, " a"))))
        r.publish(job.reply_to, protocol.encode_event(final_for(job, [tok(5, " a"), tok(6, " b")], " a b")))
        body = resp.raw.read()
    events = [json.loads(chunk[5:]) for chunk in body.split(b"\n\n") if chunk]
    assert [e["token"]["text"] for e in events] == [" a", " b"]
    assert events[-1]["generated_text"] == " a b"
    assert events[-1]["details"] == {"finish_reason": "length", "generated_tokens": 2, "seed": None}

    # a non-stream client that gives up: its job is flagged cancelled and counted as dropped
    waiter = threading.Thread(target=lambda: _give_up(server), daemon=True)
    waiter.start()
    job = _pop(r)
    waiter.join(5)
    deadline = time.monotonic() + 5
    while not r.exists(protocol.cancel_key(job.request_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.exists(protocol.cancel_key(job.request_id))
    assert sample(_scrape(server), 'tgi_request_failure{err="dropped"}') == 1


def test_official_client(server: str, redis_server) -> None:
    """text-generation (the TGI Python client) talks to tgq: compat route, list body, errors, streams."""
    from text_generation import Client
    from text_generation.errors import ValidationError as ClientValidationError

    r = redis.Redis.from_url(redis_server.url)
    client = Client(server, timeout=10)

    def answer() -> None:
        job = _pop(r)
        assert job.want_tokens and job.want_prefill  # the client always asks for details
        tokens = [tok(5, " a", -0.5), tok(6, " b", -0.25)]
        r.publish(job.reply_to, protocol.encode_event(final_for(job, tokens, " a b", seed=2**63 + 1)))

    worker = threading.Thread(target=answer, daemon=True)
    worker.start()
    out = client.generate("hello", max_new_tokens=2, do_sample=True)
    worker.join(5)
    assert out.generated_text == " a b"  # the client sends return_full_text=False
    assert out.details.generated_tokens == 2 and out.details.seed == 2**63 + 1
    assert [t.text for t in out.details.tokens] == [" a", " b"]

    with pytest.raises(ClientValidationError, match="`top_k` must be strictly positive"):
        requests_validation(server)

    def answer_stream() -> None:
        job = _pop(r)
        r.publish(job.reply_to, protocol.encode_event(TokenEvent(job.request_id, 0, 0, tok(5, " a"))))
        r.publish(job.reply_to, protocol.encode_event(final_for(job, [tok(5, " a"), tok(6, " b")], " a b")))

    worker = threading.Thread(target=answer_stream, daemon=True)
    worker.start()
    events = list(client.generate_stream("hello", max_new_tokens=2))
    worker.join(5)
    assert [e.token.text for e in events] == [" a", " b"]
    assert events[-1].generated_text == " a b" and events[-1].details.finish_reason == "length"


def requests_validation(server: str) -> None:
    """The client checks top_k itself; send the request raw and let the client map our error body."""
    from text_generation.errors import parse_error

    resp = requests.post(server + "/", json={"inputs": "hello", "parameters": {"top_k": -1}}, timeout=5)
    raise parse_error(resp.status_code, resp.json())


def _give_up(server: str) -> None:
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(server + "/generate", json={"inputs": "hello"}, timeout=(2, 0.5))
