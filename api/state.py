"""The objects one API process shares between requests (kept in `app.extensions["tgq"]`)."""
from __future__ import annotations

from dataclasses import dataclass

import redis

from common.settings import ApiSettings, LimitSettings

from .metrics import Metrics
from .reaping import LeaseReaper
from .replies import ReplyHub
from .service import GenerationService
from .validation import Validator


@dataclass
class TgqState:
    model_id: str
    limits: LimitSettings
    api: ApiSettings
    redis: redis.Redis
    hub: ReplyHub
    validator: Validator
    service: GenerationService
    metrics: Metrics
    keepalive_s: float = 15.0
    reaper: LeaseReaper | None = None

    def close(self) -> None:
        """Stop the reply reader and drop connections (tests; gunicorn just exits)."""
        self.hub.close()
        if self.reaper is not None:
            self.reaper.close()
        self.redis.close()
