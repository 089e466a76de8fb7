"""`tgq serve` brings up a private redis-server, a worker and the API, and takes them all down."""
from __future__ import annotations

import signal

import psutil
import pytest
import requests

from tests.support.processes import TgqProcess, wait_http
from tests.support.redis_server import free_port

pytestmark = pytest.mark.integration


def test_serve_runs_everything_and_stops_cleanly(tiny_model_dir, tmp_path):
    port = free_port()
    proc = TgqProcess(["serve", "--model", tiny_model_dir, "--port", str(port), "--host", "127.0.0.1",
                       "--dtype", "fp32", "--workers", "1", "--cache-dir", str(tmp_path)],
                      env={"TGQ_REDIS_URL": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url, [proc], path="/health", timeout=180)
        resp = requests.post(url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}},
                             timeout=60)
        assert resp.status_code == 200, resp.text
        children = psutil.Process(proc.proc.pid).children(recursive=True)
        assert any("redis-server" in " ".join(c.cmdline()) for c in children)
        proc.send(signal.SIGTERM)
        assert proc.proc.wait(60) == 0
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [c.cmdline() for c in alive]
    finally:
        proc.stop()
        assert "serving" in proc.output(), proc.output()[-3000:]
