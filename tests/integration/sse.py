"""A strict reader of TGI's SSE framing, for tests."""
from __future__ import annotations

import json

import requests


def stream_events(url: str, body: dict, timeout: float = 60) -> tuple[requests.Response, list[dict], bytes]:
    """POST and return (response, decoded events, raw body); asserts the framing as it reads."""
    resp = requests.post(url, json=body, stream=True, timeout=timeout)
    raw = b"".join(resp.iter_content(chunk_size=None))
    events = []
    for frame in raw.split(b"\n\n"):
        if not frame or frame == b":":
            continue
        assert frame.startswith(b"data:{"), frame  # no space after `data:`
        events.append(json.loads(frame[len(b"data:"):]))
    assert raw.endswith(b"\n\n")
    return resp, events, raw
