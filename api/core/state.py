"""The objects one API process shares between requests (kept in `app.extensions["tgq"]`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import redis

from common.settings import ApiSettings

from .metrics import Metrics
from .models import ModelRegistry
from .reaping import LeaseReaper
from .replies import ReplyHub
from .service import GenerationService


@dataclass
class TgqState:
    models: ModelRegistry
    api: ApiSettings
    redis: redis.Redis
    hub: ReplyHub
    service: GenerationService
    metrics: Metrics
    keepalive_s: float = 15.0
    reapers: list[LeaseReaper] = field(default_factory=list)

    def close(self) -> None:
        """Stop the reply reader and drop connections (tests; gunicorn just exits)."""
        self.hub.close()
        for reaper in self.reapers:
            reaper.close()
        self.redis.close()
