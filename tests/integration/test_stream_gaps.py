"""Pub/sub delivers at most once: a stream whose reply subscription drops mid-way must still show
every token, in order, exactly once (real worker, real API, the subscription killed on purpose)."""
from __future__ import annotations

import json
import threading

import pytest
import requests

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"
NEW_TOKENS = 400


def stream_ids(url: str, body: dict, on_event: threading.Event, after: int) -> tuple[list[int], dict]:
    """Read a TGI stream; set `on_event` once `after` token events arrived. Returns (ids, last event)."""
    ids: list[int] = []
    last: dict = {}
    with requests.post(url + "/generate_stream", json=body, stream=True, timeout=120) as resp:
        for line in resp.iter_lines():
            if not line.startswith(b"data:"):
                continue
            last = json.loads(line[len(b"data:"):])
            assert "error" not in last, last
            ids.append(last["token"]["id"])
            if len(ids) == after:
                on_event.set()
    return ids, last


def test_a_stream_survives_lost_reply_messages_without_a_hole(stack):
    params = {"max_new_tokens": NEW_TOKENS, "details": True}
    reference = requests.post(stack.url + "/generate", json={"inputs": PROMPT, "parameters": params}, timeout=120)
    expected = [t["id"] for t in reference.json()["details"]["tokens"]]
    assert len(expected) > 20, "the model must generate long enough for the subscription to drop mid-way"

    started = threading.Event()
    result: dict = {}

    def read() -> None:
        result["ids"], result["last"] = stream_ids(stack.url, {"inputs": PROMPT, "parameters": params}, started, 3)

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(60)
    killed = stack.redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # the API's reply subscriptions
    assert killed >= 1
    reader.join(120)
    assert result["ids"] == expected  # every token, in order, once: no hole, no repeat
    assert result["last"]["details"]["generated_tokens"] == len(expected)
    assert result["last"]["generated_text"] == reference.json()["generated_text"]


def test_an_openai_stream_survives_lost_reply_messages(stack):
    body = {"prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0}
    full = requests.post(stack.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    started = threading.Event()
    pieces: list[str] = []

    def read() -> None:
        with requests.post(stack.url + "/v1/completions", json={**body, "stream": True}, stream=True,
                           timeout=120) as resp:
            for line in resp.iter_lines():
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[len(b"data: "):])
                    assert "error" not in chunk, chunk
                    pieces.append(chunk["choices"][0]["text"])
                    if len(pieces) == 3:
                        started.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(60)
    assert stack.redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
    reader.join(120)
    assert "".join(pieces) == full
