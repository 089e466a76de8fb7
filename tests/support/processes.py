"""Real tgq processes (API under gunicorn, workers) for integration tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from .redis_server import free_port


class TgqProcess:
    """`python -m common.cli <args>` with its output in a log file (shown when a test fails).

    `cwd` runs another checkout's code (`-m` puts the working directory first on sys.path)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None) -> None:
        self.args = args
        self.log = Path(tempfile.mkstemp(prefix="tgq-", suffix=".log")[1])
        self._log_file = open(self.log, "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "common.cli", *args], stdout=self._log_file,
                                     stderr=subprocess.STDOUT, env=full_env, start_new_session=True, cwd=cwd)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")

    def send(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process and its children (gunicorn forks its workers)."""
        if self.alive():
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 20) -> int | None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


def start_worker(redis_url: str, model: str, *extra: str, cache_dir: str = "",
                 env: dict[str, str] | None = None) -> TgqProcess:
    args = ["worker", "--redis-url", redis_url, "--model", model, "--dtype", "fp32", "--threads", "1"]
    if cache_dir:
        args += ["--cache-dir", cache_dir]
    return TgqProcess(args + list(extra), env=env)


def start_api(redis_url: str, model: str, *extra: str, cache_dir: str = "",
              env: dict[str, str] | None = None) -> tuple[TgqProcess, str]:
    port = free_port()
    args = ["api", "--redis-url", redis_url, "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--workers", "2"]
    if cache_dir:
        args += ["--cache-dir", cache_dir]
    proc = TgqProcess(args + list(extra), env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_http(url: str, procs: list[TgqProcess], timeout: float = 120, path: str = "/metrics") -> None:
    """Wait until `url + path` answers; fail with the processes' logs if one exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"process {p.args[:1]} exited:\n{p.output()[-4000:]}")
        try:
            if requests.get(url + path, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError("timed out waiting for " + url + "\n" + "\n".join(p.output()[-3000:] for p in procs))


def worker_name(proc: TgqProcess) -> str:
    """The name a `tgq worker` process registers in RQ: its --name, else host.pid (worker/main.py)."""
    if "--name" in proc.args:
        return proc.args[proc.args.index("--name") + 1]
    return f"{socket.gethostname()}.{proc.proc.pid}"


def wait_worker_ready(redis_client, procs: list[TgqProcess], timeout: float = 180) -> None:
    """Wait until each of `procs` has registered its RQ worker (it registers once its model is loaded).

    By name, not by count: a worker killed by an earlier test stays registered until its TTL runs out."""
    from rq import Worker

    expected = {worker_name(p) for p in procs}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"worker exited:\n{p.output()[-4000:]}")
        if expected <= {w.name for w in Worker.all(connection=redis_client)}:
            return
        time.sleep(0.2)
    raise RuntimeError("timed out waiting for workers\n" + "\n".join(p.output()[-3000:] for p in procs))
