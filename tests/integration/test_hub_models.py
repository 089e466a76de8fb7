"""`--model org/name` in real processes, offline, against a hand-built Hub cache: a wrong `--model` is
one line on stderr and exit status 2 (no traceback) for `tgq worker`, `tgq api` and `tgq serve`; and an
API and a worker given the same Hub id meet on one queue and serve it under its repo id."""
from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.support.processes import TgqProcess, start_api, start_worker, wait_http, wait_worker_ready

pytestmark = pytest.mark.integration

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"  # never contacted: the model is resolved first


def run_to_exit(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    proc = TgqProcess(args, env=env)
    try:
        code = proc.proc.wait(timeout)
    finally:
        proc.stop()
    return code, proc.output()


def assert_one_error_line(code: int, output: str, *parts: str) -> None:
    assert code == 2, output
    lines = output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tgq: error: --model "), output
    assert "Traceback" not in output
    for part in parts:
        assert part in lines[0], output


@pytest.mark.parametrize("command", [
    ["worker", "--redis-url", UNREACHABLE_REDIS],
    ["api", "--redis-url", UNREACHABLE_REDIS],
    ["serve", "--redis-url", UNREACHABLE_REDIS],
])
def test_a_hub_id_missing_from_the_cache_is_one_error_line(command: list[str], tmp_path: Path) -> None:
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    code, output = run_to_exit([*command, "--model", "tgq-tests/absent"], env)
    assert_one_error_line(code, output, "tgq-tests/absent", "revision 'main'", str(tmp_path),
                          "hf download tgq-tests/absent", "unset HF_HUB_OFFLINE")


def test_a_revision_missing_from_the_cache_is_one_error_line(hub_model) -> None:
    code, output = run_to_exit(["worker", "--redis-url", UNREACHABLE_REDIS, "--model", f"{hub_model.repo_id}@v9"],
                               hub_model.env())
    assert_one_error_line(code, output, f"revision 'v9' of {hub_model.repo_id}", str(hub_model.cache))


@pytest.mark.parametrize("make_spec, message", [
    (lambda tmp: str(tmp / "absent"), "is not 'smollm2', an existing"),
    (lambda tmp: str(tmp), "is a directory without config.json"),
])
def test_a_wrong_local_model_is_one_error_line(make_spec, message: str, tmp_path: Path) -> None:
    for command in (["worker", "--redis-url", UNREACHABLE_REDIS], ["serve", "--redis-url", UNREACHABLE_REDIS]):
        code, output = run_to_exit([*command, "--model", make_spec(tmp_path)], {})
        assert_one_error_line(code, output, message)


def test_an_api_and_a_worker_given_one_hub_id_serve_it_under_its_repo_id(redis_url, conn, hub_model) -> None:
    env = hub_model.env()
    api, url = start_api(redis_url, hub_model.repo_id, env=env)
    worker = start_worker(redis_url, hub_model.repo_id, env=env)
    try:
        wait_worker_ready(conn, [worker])
        wait_http(url, [api])
        models = requests.get(url + "/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == [hub_model.repo_id] and models[0]["workers"] == 1
        resp = requests.post(url + "/v1/chat/completions", timeout=60, json={
            "model": hub_model.repo_id, "max_tokens": 3, "temperature": 0,
            "messages": [{"role": "user", "content": "hello"}]})
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == hub_model.repo_id and resp.json()["usage"]["completion_tokens"] >= 1
    finally:
        api.stop()
        worker.stop(40)
    assert f"model {hub_model.repo_id} loaded" in worker.output(), worker.output()[-3000:]
