"""A worker given a `--metrics-port` that is taken stops with one error line, before it registers."""
from __future__ import annotations

import socket

import pytest
import redis
from rq import Worker

from tests.support.processes import start_worker

pytestmark = pytest.mark.integration


def test_a_taken_metrics_port_is_one_error_line_and_no_registration(redis_url, tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # load-test mode: no model to load, so the port is tried within a second or two
        proc = start_worker(redis_url, tiny_model_dir, "--metrics-port", str(port), "--load-test-tokens-per-s", "10",
                            "--name", "port-taken")
        try:
            code = proc.proc.wait(60)
        finally:
            proc.stop()
    out = proc.output()
    assert code == 2, out
    assert "Traceback" not in out
    assert out.strip().splitlines()[-1].startswith(f"tgq: error: --metrics-port {port}: "), out
    assert "port-taken" not in {w.name for w in Worker.all(connection=redis.Redis.from_url(redis_url))}
