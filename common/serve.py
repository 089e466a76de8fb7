"""`tgq serve`: everything on one machine for a first try.

Resolves each `--model` first, here (a wrong one fails before anything starts; a Hub model is
downloaded once), then starts a private redis-server on a free port (unless a Redis URL is given),
one worker per served model and the API as child processes, handing them each model's directory and
id, prints the URL, and stops them all (API first, Redis last) on exit.
"""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import model_files
from .settings import ApiSettings, LimitSettings, ServedModelsSettings, WorkerSettings, to_cli_args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_private_redis() -> tuple[subprocess.Popen, str, Path]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("tgq serve: redis-server not found; install it (Debian: apt-get install "
                         "redis-server) or pass --redis-url")
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="tgq-redis-"))
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0", workdir
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("tgq serve: the private redis-server did not start")


def _wait_healthy(url: str, procs: list[subprocess.Popen], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(url + "/health", timeout=30) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def _stop(proc: subprocess.Popen, timeout: float, *, signalled: bool = False) -> None:
    if proc.poll() is None:
        if not signalled:  # a second SIGTERM would make a worker exit without finishing its batch
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def resolve_models(models: ServedModelsSettings) -> ServedModelsSettings:
    """`models` resolved, with each one's id: a model directory (a Hub model's snapshot included) is
    handed to the children as its path, so they load the same files without asking the Hub again; a
    GGUF keeps its spec (its conversion cache is keyed by the path the spec leads to). Raises
    ModelNotFound or SettingsError."""
    entries = models.entries()
    sources = model_files.resolve_each(entries)
    for source in sources:
        if not source.is_gguf:  # a GGUF's tokenizer is converted by the API child
            model_files.ensure_tokenizer(source, models.cache_dir)
    return ServedModelsSettings(model=tuple(m.model if s.is_gguf else str(s.path) for m, s in zip(entries, sources)),
                                model_id=tuple(s.model_id for s in sources), cache_dir=models.cache_dir)


def run_serve(redis_url: str | None, models: ServedModelsSettings, limits: LimitSettings, api: ApiSettings,
              worker: WorkerSettings) -> int:
    resolved = resolve_models(models)  # before any child: a wrong --model is one error line, here
    redis_proc = None
    redis_dir = None
    if not redis_url:
        redis_proc, redis_url, redis_dir = start_private_redis()
    base = [sys.executable, "-m", "common.cli"]
    common_args = ["--redis-url", redis_url] + to_cli_args(limits)
    worker_procs = [subprocess.Popen(base + ["worker"] + common_args + to_cli_args(m) + to_cli_args(worker))
                    for m in resolved.entries()]
    api_proc = subprocess.Popen(base + ["api"] + common_args + to_cli_args(resolved) + to_cli_args(api))
    children = [*worker_procs, api_proc]
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host = "127.0.0.1" if api.host in ("0.0.0.0", "") else api.host
    url = f"http://{host}:{api.port}"
    print(f"tgq: starting (redis {redis_url}); first start converts the model, which takes ~30 s",
          file=sys.stderr, flush=True)
    code = 0
    try:
        if _wait_healthy(url, children, timeout=600):
            print(f"tgq: serving {', '.join(models.model)} at {url}  (Ctrl-C to stop)", flush=True)
        elif not stopping:
            print("tgq: the server did not become healthy", file=sys.stderr)
            code = 1
        while not stopping and code == 0:
            if any(p.poll() is not None for p in children):
                print("tgq: a child process exited", file=sys.stderr)
                code = 1
                break
            time.sleep(0.5)
    finally:
        _stop(api_proc, 35)
        for proc in worker_procs:
            proc.terminate()  # all at once: each gets its grace period in parallel
        for proc in worker_procs:
            _stop(proc, worker.grace_period + 5, signalled=True)
        if redis_proc is not None:
            _stop(redis_proc, 5)
            shutil.rmtree(redis_dir, ignore_errors=True)
    return code
