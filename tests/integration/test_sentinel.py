"""Redis failover for real on loopback: a primary, a replica and three sentinels; the API and the
worker connect through a redis+sentinel:// URL; the primary is SIGKILLed under streaming load."""
from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis
import requests

from common.redis_client import connect
from common.settings import RedisSettings
from tests.support.processes import start_api, start_worker, wait_http, wait_worker_ready
from tests.support.redis_server import free_port

from .conftest import MODEL_ID

pytestmark = pytest.mark.integration

SERVICE = "tgq-primary"
RECOVERY_LIMIT_S = 60


def spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([shutil.which("redis-server") or "redis-server", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ping(port: int, timeout: float = 10) -> None:
    client = redis.Redis(port=port)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            assert time.monotonic() < deadline, f"port {port} did not answer"
            time.sleep(0.05)


@pytest.fixture
def sentinels():
    workdir = Path(tempfile.mkdtemp(prefix="tgq-sentinel-"))
    primary, replica = free_port(), free_port()
    procs = {"primary": spawn(["--port", str(primary), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)])}
    wait_ping(primary)
    procs["replica"] = spawn(["--port", str(replica), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir),
                              "--replicaof", "127.0.0.1", str(primary)])
    wait_ping(replica)
    ports = [free_port() for _ in range(3)]
    for i, port in enumerate(ports):
        conf = workdir / f"sentinel-{i}.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                        f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
                        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                        f"sentinel failover-timeout {SERVICE} 10000\n")
        procs[f"sentinel-{i}"] = spawn([str(conf), "--sentinel"])
        wait_ping(port)
    url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in ports) + f"/{SERVICE}/0"
    yield url, procs, primary
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)


def stream(url: str) -> str:
    """Read one stream to its end: 'complete', or the error it ended with."""
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 300}}
    last: dict = {}
    with requests.post(url + "/generate_stream", json=body, stream=True, timeout=120) as resp:
        if resp.status_code != 200:
            return f"HTTP {resp.status_code}"
        for line in resp.iter_lines():
            if line.startswith(b"data:"):
                last = json.loads(line[len(b"data:"):])
    if "error" in last:
        return last["error"]
    return "complete" if last.get("generated_text") is not None else "cut"


def test_a_failover_under_streaming_load(sentinels, tiny_model_dir):
    url, procs, primary_port = sentinels
    api, api_url = start_api(url, tiny_model_dir, "--model-id", MODEL_ID, "--request-timeout", "60")
    worker = start_worker(url, tiny_model_dir, "--model-id", MODEL_ID)
    try:
        wait_worker_ready(connect(RedisSettings(url)), [worker])
        wait_http(api_url, [api])
        assert requests.post(api_url + "/generate", json={"inputs": "Hello"}, timeout=60).status_code == 200

        with cf.ThreadPoolExecutor(4) as pool:
            in_flight = [pool.submit(stream, api_url) for _ in range(4)]
            time.sleep(0.5)
            procs["primary"].send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            recovered_at = None
            while recovered_at is None:
                assert time.monotonic() - killed_at < RECOVERY_LIMIT_S, "no request succeeded after the failover"
                try:
                    ok = requests.post(api_url + "/generate", json={"inputs": "Hello"}, timeout=30).status_code == 200
                except requests.RequestException:
                    ok = False
                if ok:
                    recovered_at = time.monotonic()
                else:
                    time.sleep(0.2)
            outcomes = [f.result(timeout=120) for f in in_flight]
        recovery_s = recovered_at - killed_at
        print(f"\nfailover: first successful request {recovery_s:.2f} s after the primary was killed; "
              f"in-flight streams: {outcomes}")
        clear = {"complete", "Incomplete generation"}
        assert all(o in clear or o.startswith("Service unavailable") for o in outcomes), outcomes
        promoted = connect(RedisSettings(url))
        assert promoted.connection_pool.get_master_address()[1] != primary_port  # the replica took over
        answers = [requests.post(api_url + "/generate", json={"inputs": p}, timeout=60).status_code
                   for p in ("Hello there", "One two three")]
        assert answers == [200, 200]
        assert stream(api_url) == "complete"
        assert all(p.poll() is None for p in (api.proc, worker.proc))  # nothing was restarted by hand
    finally:
        api.stop()
        worker.stop(40)
