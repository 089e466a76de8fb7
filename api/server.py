"""`run_api`: the API under gunicorn (gevent workers), started from Python, not a command line.

The master resolves each model's id and tokenizer once (a GGUF conversion must not run in every
worker, nor a Hub look-up), wipes and sets PROMETHEUS_MULTIPROC_DIR *before* anything imports
prometheus-client or forks, and then each worker builds its own app (its own Redis pool and reply
subscription) after the fork.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from gunicorn.app.base import BaseApplication

from common import model_files
from common.settings import ApiSettings, LimitSettings, RedisSettings, ServedModelsSettings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
REAP_EVERY_S = 2.0  # each gunicorn worker sweeps for dead workers' leases this often
WORKER_CONNECTIONS = 1000


class GunicornApp(BaseApplication):  # type: ignore[misc]
    def __init__(self, options: dict[str, Any], factory: Callable[[], Any]) -> None:
        self.options = options
        self.factory = factory
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self.factory()


def prepare_metrics_dir(existing: str | None) -> str:
    """An empty directory for prometheus-client's multiprocess files (old ones would add up)."""
    if existing:
        path = Path(existing)
        if path.is_dir():
            for child in path.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        path.mkdir(parents=True, exist_ok=True)
        return str(path)
    return tempfile.mkdtemp(prefix="tgq-prometheus-")


def _child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, os.environ.get(MULTIPROC_ENV))


def gunicorn_options(api: ApiSettings) -> dict[str, Any]:
    return {
        "bind": f"{api.host}:{api.port}",
        "workers": api.workers,
        "worker_class": "gevent",
        "worker_connections": WORKER_CONNECTIONS,
        "graceful_timeout": api.graceful_timeout,  # SIGTERM: open requests (streams) get this long
        "timeout": 60,  # heartbeat of a worker's event loop, not a request limit
        "keepalive": 5,
        "child_exit": _child_exit,
        "preload_app": False,  # each worker builds its app after the fork (Redis, reply thread)
        "control_socket_disable": True,  # gunicorn 27's control socket path is shared per user
    }


def served_models(models: ServedModelsSettings) -> tuple[tuple[str, str], ...]:
    """Each served model's (id, tokenizer directory), in order: a GGUF's tokenizer is converted once
    into the cache, a Hub model's tokenizer files are found (or downloaded, weights left out) in the
    Hub's cache.

    Raises SettingsError when two models end up with the same id (their queues would be one), and
    model_files.ModelNotFound when a --model names nothing loadable."""
    entries = models.entries()
    sources = model_files.resolve_each(entries, weights=False)
    return tuple((source.model_id, str(model_files.ensure_tokenizer(source, m.cache_dir)))
                 for source, m in zip(sources, entries))


def run_api(redis: RedisSettings, models: ServedModelsSettings, limits: LimitSettings, api: ApiSettings) -> int:
    """Serve the API until gunicorn's master stops; returns its exit status."""
    metrics_dir = prepare_metrics_dir(os.environ.get(MULTIPROC_ENV))
    os.environ[MULTIPROC_ENV] = metrics_dir
    served = served_models(models)  # once, here: a GGUF's conversion must not run in every worker
    created = int(time.time())

    def factory() -> Any:
        # Imported in the worker, after gevent patched it; prometheus-client sees the variable.
        from .app import AppConfig, create_app

        return create_app(AppConfig(redis=redis, models=models, limits=limits, api=api,
                                    metrics_dir=metrics_dir, served=served,
                                    reap_every_s=REAP_EVERY_S, created=created))

    try:
        GunicornApp(gunicorn_options(api), factory).run()
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":  # pragma: no cover - convenience: python -m api.server
    from common.settings import from_env

    sys.exit(run_api(from_env(RedisSettings), from_env(ServedModelsSettings), from_env(LimitSettings),
                     from_env(ApiSettings)))
