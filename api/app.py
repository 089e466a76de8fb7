"""`create_app(config)`: the Flask application factory. Wires objects together; defines no routes.

Settings come in through `AppConfig` (built by `api.server.run_api` or by tests); nothing here
reads the environment. Redis is not contacted until the first request needs it.
"""
from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from flask import Flask, Response, request

from common.errors import Unauthorized
from common.redis_client import connect
from common.settings import ApiSettings, LimitSettings, RedisSettings, ServedModelsSettings

from . import docs, playground, tgi, v1
from .core.metrics import Metrics
from .core.models import ModelRegistry, ServedModel
from .core.reaping import LeaseReaper
from .core.replies import ReplyHub
from .core.service import GenerationService
from .core.state import TgqState
from .errors import register_error_handlers
from .server import WORKER_CONNECTIONS, served_models

CORS_METHODS = "GET,POST"
# What `--api-key` guards: every route that generates, tokenizes or lists models.
GUARDED_ENDPOINTS = tgi.GUARDED_ENDPOINTS | v1.GUARDED_ENDPOINTS
CORS_VARY = "origin, access-control-request-method, access-control-request-headers"


@dataclass(frozen=True)
class AppConfig:
    redis: RedisSettings
    models: ServedModelsSettings
    limits: LimitSettings
    api: ApiSettings
    metrics_dir: str | None = None  # PROMETHEUS_MULTIPROC_DIR under gunicorn; None: in-process metrics
    # each served model's (id, tokenizer directory), in order; None: found through common.model_files
    served: tuple[tuple[str, str], ...] | None = None
    keepalive_s: float = 15.0  # SSE comment after this much silence (axum's KeepAlive default)
    reap_every_s: float = 0.0  # sweep for dead workers' leases (api.core.reaping); 0: leave it to workers
    created: int = 0  # when the API started serving its models (/v1/models); 0: now


def create_app(config: AppConfig, *, redis_client: redis.Redis | None = None) -> Flask:
    app = Flask("api")
    api = config.api
    app.config["MAX_CONTENT_LENGTH"] = api.max_body_bytes
    # A pooled connection for every connection gevent serves at once: under a burst each request
    # waits only for Redis, not for a connection other requests hold while they wait for the CPU.
    client = redis_client or connect(config.redis, max_connections=WORKER_CONNECTIONS)
    served = config.served or served_models(config.models)
    created = config.created or int(time.time())  # set by the master, so every process agrees
    models = ModelRegistry([
        ServedModel.load(model_id, Path(d), config.limits, client, job_timeout_s=api.request_timeout,
                         created=created)
        for model_id, d in served])
    hub = ReplyHub(client)
    state = TgqState(models=models, api=api, redis=client, hub=hub,
                     service=GenerationService(hub, api.request_timeout),
                     metrics=Metrics(config.limits, config.metrics_dir), keepalive_s=config.keepalive_s)
    if config.reap_every_s > 0:
        state.reapers = [LeaseReaper(m.queue.queue, config.reap_every_s) for m in models.models]
        for reaper in state.reapers:
            reaper.start()
    app.extensions["tgq"] = state

    for bp in tgi.BLUEPRINTS:
        app.register_blueprint(bp)
    app.register_blueprint(v1.bp)
    app.register_blueprint(docs.bp)
    app.register_blueprint(playground.bp)
    register_error_handlers(app, default=tgi.errors.error_response)
    _install_cors(app, api)
    _install_api_key(app, api)
    return app


def _install_api_key(app: Flask, api: ApiSettings) -> None:
    if not api.api_key:
        return
    expected = f"Bearer {api.api_key}".encode()

    @app.before_request
    def _check_key() -> None:
        if request.method == "OPTIONS" or request.endpoint not in GUARDED_ENDPOINTS:
            return
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise Unauthorized()


def _install_cors(app: Flask, api: ApiSettings) -> None:
    """tower-http's CorsLayer as TGI configures it: GET and POST, header content-type, origin `*`
    unless `--cors-allow-origin` lists origins. Every OPTIONS request is answered as a preflight."""
    allowed = frozenset(o.strip() for o in api.cors_allow_origin.split(",") if o.strip())
    allow_headers = "content-type,authorization" if api.api_key else "content-type"

    def allow_origin() -> str | None:
        if not allowed:
            return "*"
        origin = request.headers.get("Origin")
        return origin if origin in allowed else None

    @app.before_request
    def _preflight() -> Response | None:
        if request.method != "OPTIONS":
            return None
        resp = Response(b"", status=200)
        resp.headers["Access-Control-Allow-Methods"] = CORS_METHODS
        resp.headers["Access-Control-Allow-Headers"] = allow_headers
        return resp

    @app.after_request
    def _headers(resp: Response) -> Response:
        origin = allow_origin()
        if origin is not None:
            resp.headers["Access-Control-Allow-Origin"] = origin
        resp.headers["Vary"] = CORS_VARY
        return resp
