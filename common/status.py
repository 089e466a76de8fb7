"""`tgq status`: the fleet as Redis sees it, in the manner of `rq info` (reads Redis only).

Per model (every RQ queue named by `protocol.queue_name`): jobs waiting, how long the oldest has
waited, 429s answered in the last minute, live workers. Per worker (its `protocol.worker_status_key`
hash, rewritten about once a second while it lives): host, model, batch rows / capacity, tok/s
and the age of its last write.
"""
from __future__ import annotations

import datetime as dt
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import redis
from rq import Queue

from . import protocol

RQ_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"  # how RQ writes `enqueued_at` in a job hash


@dataclass(frozen=True)
class ModelRow:
    model: str
    waiting: int
    oldest_wait_s: float | None  # None: nothing waits
    overloaded_last_minute: int
    workers: int


@dataclass(frozen=True)
class WorkerRow:
    name: str
    host: str
    model: str
    rows: int
    capacity: int
    tok_s: float
    heartbeat_age_s: float


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _age(enqueued_at: Any, now: float) -> float | None:
    if not enqueued_at:
        return None
    at = dt.datetime.strptime(_text(enqueued_at), RQ_TIME).replace(tzinfo=dt.timezone.utc)
    return max(0.0, now - at.timestamp())


def read(client: redis.Redis, now: float | None = None) -> tuple[list[ModelRow], list[WorkerRow]]:
    now = time.time() if now is None else now
    workers = _workers(client, now)
    models = []
    prefix = protocol.queue_name("")
    for queue in sorted(Queue.all(connection=client), key=lambda q: q.name):
        if not queue.name.startswith(prefix):
            continue
        model = queue.name[len(prefix):]
        pipe = client.pipeline(transaction=False)
        pipe.llen(queue.key)
        pipe.lindex(queue.key, 0)  # RQ pops from the head: the oldest waiting job
        pipe.zcount(protocol.overloaded_key(model), now - protocol.OVERLOAD_WINDOW_S, "+inf")
        waiting, oldest, overloaded = pipe.execute()
        enqueued_at = client.hget(queue.job_class.key_for(_text(oldest)), "enqueued_at") if oldest else None
        models.append(ModelRow(model=model, waiting=int(waiting), oldest_wait_s=_age(enqueued_at, now),
                               overloaded_last_minute=int(overloaded),
                               workers=sum(w.model == model for w in workers)))
    return models, workers


def _workers(client: redis.Redis, now: float) -> list[WorkerRow]:
    keys = sorted(client.scan_iter(match=protocol.worker_status_pattern(), count=500))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    rows = []
    for key, fields in zip(keys, pipe.execute()):
        f = {_text(k): _text(v) for k, v in fields.items()}
        if not f:
            continue  # expired between the scan and the read
        rows.append(WorkerRow(name=_text(key).rsplit(":", 1)[-1], host=f["host"], model=f["model"],
                              rows=int(f["rows"]), capacity=int(f["capacity"]), tok_s=float(f["tok_s"]),
                              heartbeat_age_s=max(0.0, now - float(f["at"]))))
    return rows


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def render(models: list[ModelRow], workers: list[WorkerRow]) -> str:
    lines = [f"{'model':<24} {'waiting':>7} {'oldest wait':>11} {'429s/min':>8} {'workers':>7}"]
    lines += [f"{m.model:<24} {m.waiting:>7} {_seconds(m.oldest_wait_s):>11} {m.overloaded_last_minute:>8} "
              f"{m.workers:>7}" for m in models]
    lines += ["", f"{'worker':<28} {'host':<16} {'model':<16} {'rows':>9} {'tok/s':>8} {'heartbeat':>9}"]
    lines += [f"{w.name:<28} {w.host:<16} {w.model:<16} {f'{w.rows}/{w.capacity}':>9} {w.tok_s:>8.1f} "
              f"{_seconds(w.heartbeat_age_s):>9}" for w in workers]
    return "\n".join(lines)


def run_status(client: redis.Redis, *, as_json: bool, watch: float, out: TextIO = sys.stdout) -> int:
    """Print the status once, or every `watch` seconds until interrupted."""
    try:
        while True:
            models, workers = read(client)
            if as_json:
                out.write(json.dumps({"at": time.time(), "models": [asdict(m) for m in models],
                                      "workers": [asdict(w) for w in workers]}) + "\n")
            else:
                out.write(("\x1b[H\x1b[2J" if watch else "") + render(models, workers) + "\n")
            out.flush()
            if not watch:
                return 0
            time.sleep(watch)
    except KeyboardInterrupt:
        return 0
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        print(f"tgq status: Redis cannot be reached: {exc}", file=sys.stderr)
        return 1
