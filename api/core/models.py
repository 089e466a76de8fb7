"""The models one API serves: each with its tokenizer, chat template, validator, queue and limits.

TGI's routes use the first (default) model; the /v1 routes pick one by the request's `model` field
(`ModelRegistry.route`). No Flask here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import redis
from rq.worker_registration import get_keys
from tokenizers import Tokenizer

from common.errors import ServiceError
from common.settings import LimitSettings

from .chat_template import ChatTemplate
from .queue import JobQueue
from .validation import Validator

# Names that mean "the served model" on the /v1 routes: huggingface_hub sends "dummy" when its
# client was built from a URL, and TGI documents "tgi".
DEFAULT_NAMES = frozenset({"", "tgi", "dummy"})


class UnknownModel(ServiceError):
    status_code = 404
    error_type = "model_not_found"
    metric_label = "validation"

    def __init__(self, name: str, served: Sequence[str]) -> None:
        super().__init__(f"The model `{name}` does not exist. Served models: {', '.join(served)}")
        self.name = name


def load_tokenizer(path: str | Path) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()  # lengths are checked against the limits, never cut silently
    tok.no_padding()
    return tok


@dataclass
class ServedModel:
    id: str
    limits: LimitSettings
    tokenizer: Tokenizer
    validator: Validator
    queue: JobQueue
    template: ChatTemplate | None
    created: int  # epoch seconds the API started serving it (/v1/models' `created`)

    @classmethod
    def load(cls, model_id: str, tokenizer_dir: Path, limits: LimitSettings, client: redis.Redis, *,
             job_timeout_s: float, created: int) -> ServedModel:
        tokenizer = load_tokenizer(tokenizer_dir / "tokenizer.json")
        return cls(id=model_id, limits=limits, tokenizer=tokenizer, validator=Validator(limits, tokenizer),
                   queue=JobQueue(client, model_id, job_timeout_s=job_timeout_s),
                   template=ChatTemplate.from_dir(tokenizer_dir), created=created)

    def admit(self, copies: int) -> None:
        """The 429 check: raises Overloaded when `copies` more jobs would pass the queue limit."""
        self.queue.check_capacity(copies, self.limits.max_queue_length)

    def live_workers(self) -> int:
        """Workers registered on this model's queue whose RQ worker key has not expired."""
        keys = sorted(get_keys(self.queue.queue, connection=self.queue.redis))
        if not keys:
            return 0
        return int(self.queue.redis.exists(*keys))


class ModelRegistry:
    def __init__(self, models: Sequence[ServedModel]) -> None:
        if not models:
            raise ValueError("an API serves at least one model")
        self.models = list(models)
        self._by_id = {m.id: m for m in self.models}

    @property
    def default(self) -> ServedModel:
        return self.models[0]

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.models]

    def route(self, name: str | None) -> ServedModel:
        """The model a /v1 request names: a served id; the default for no name, "tgi" or "dummy";
        any name at all while only one model is served (as TGI 3 does); else UnknownModel."""
        if name is not None and name in self._by_id:
            return self._by_id[name]
        if name is None or name in DEFAULT_NAMES or len(self.models) == 1:
            return self.default
        raise UnknownModel(name, self.ids)
