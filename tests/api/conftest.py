"""Fixtures for API tests: the Flask app against the session's real redis-server, and a test-side
stand-in for the worker that takes jobs with RQ and answers with real protocol events."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from api.app import AppConfig, create_app
from common import protocol
from common.schemas import ErrorEvent, Event, FinalEvent, FinishReason, GenerationJob, PrefillToken, Token, TokenEvent
from common.settings import ApiSettings, LimitSettings, RedisSettings, ServedModelsSettings
from tests.support.tiny_tokenizer import write_model_dir

LIMITS = LimitSettings(max_input_length=32, max_total_tokens=64, max_best_of=2, max_stop_sequences=4,
                       max_queue_length=3)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("tiny-model"))


@dataclass
class Harness:
    app: object
    client: object
    redis: redis.Redis
    model_id: str
    queue: Queue
    apps: list = field(default_factory=list)

    def pop_job(self, timeout: float = 5.0) -> GenerationJob:
        """Take the next job the way a worker does (RQ, JSON serializer)."""
        found = Queue.dequeue_any([self.queue], timeout=max(1, int(timeout)), connection=self.redis,
                                  serializer=JSONSerializer)
        assert found is not None, "no job was enqueued"
        job, _ = found
        return GenerationJob.from_dict(job.args[0])

    def publish(self, job: GenerationJob, event: Event) -> None:
        self.redis.publish(job.reply_to, protocol.encode_event(event))

    def store(self, event: Event) -> None:
        self.redis.set(protocol.result_key(event.request_id), protocol.encode_event(event),
                       ex=protocol.RESULT_TTL_S)

    def serve(self, script: Callable[[GenerationJob], list[Event]], jobs: int = 1) -> threading.Thread:
        """In a thread: pop `jobs` jobs and publish what `script` returns for each."""
        def run() -> None:
            for _ in range(jobs):
                job = self.pop_job()
                for event in script(job):
                    self.publish(job, event)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread


def tok(i: int, text: str, logprob: float = -0.5, special: bool = False) -> Token:
    return Token(i, text, logprob, special)


def final_for(job: GenerationJob, tokens: list[Token], text: str, *, index: int | None = None,
              reason: FinishReason = FinishReason.LENGTH, seed: int | None = None, attempt: int = 0,
              started_at: float | None = None, prefill: tuple[PrefillToken, ...] = ()) -> FinalEvent:
    now = time.time()
    return FinalEvent(request_id=job.request_id, attempt=attempt,
                      index=len(tokens) - 1 if index is None else index, token=tokens[-1],
                      generated_text=text, finish_reason=reason, generated_tokens=len(tokens), seed=seed,
                      started_at=started_at if started_at is not None else job.enqueued_at + 0.01,
                      finished_at=now, tokens=tuple(tokens) if job.want_tokens else (),
                      prefill=prefill if job.want_prefill else ())


def script_tokens(tokens: list[Token], text: str, **kw: object) -> Callable[[GenerationJob], list[Event]]:
    """A worker run: one TokenEvent per token but the last, then the FinalEvent."""
    def script(job: GenerationJob) -> list[Event]:
        events: list[Event] = [TokenEvent(job.request_id, 0, i, t) for i, t in enumerate(tokens[:-1])]
        events.append(final_for(job, tokens, text, **kw))  # type: ignore[arg-type]
        return events
    return script


def error_for(job: GenerationJob, message: str, error_type: str = "generation") -> ErrorEvent:
    return ErrorEvent(job.request_id, 0, message, error_type)


@pytest.fixture
def make_harness(redis_url: str, model_dir: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(limits: LimitSettings = LIMITS, redis_url_override: str | None = None, keepalive_s: float = 15.0,
             models: tuple[str, ...] | None = None, model_ids: tuple[str, ...] = (), **api_kw: object) -> Harness:
        api_kw.setdefault("request_timeout", 5.0)
        url = redis_url_override or redis_url
        served = ServedModelsSettings(model=models or (str(model_dir),), model_id=model_ids)
        config = AppConfig(redis=RedisSettings(url), models=served, limits=limits,
                           api=ApiSettings(**api_kw), keepalive_s=keepalive_s)  # type: ignore[arg-type]
        app = create_app(config)
        state = app.extensions["tgq"]
        client = redis.Redis.from_url(redis_url)
        model_id = state.models.default.id
        h = Harness(app=app, client=app.test_client(), redis=client, model_id=model_id,
                    queue=Queue(protocol.queue_name(model_id), connection=client,
                                serializer=JSONSerializer))
        made.append(h)
        return h

    yield make
    for h in made:
        h.app.extensions["tgq"].close()  # type: ignore[attr-defined]
        h.redis.close()


@pytest.fixture
def harness(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness()
