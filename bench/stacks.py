"""The processes a benchmark run measures: a tgq stack (redis-server, workers, API) and
llama.cpp's server, plus what is read off them (peak RSS, TCP segments to Redis)."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from . import stats

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench-results"


# ---- process helpers -----------------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_kb(pid: int, field: str = "VmHWM") -> int | None:
    """A `kB` field of /proc/<pid>/status (VmHWM: peak resident set size)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def tcp_data_segments_out(pids: list[int], port: int) -> int | None:
    """TCP data segments sent to 127.0.0.1:`port` by the processes `pids` (from `ss -ti`).

    redis-py sends one command, or one whole pipeline, with one sendall; on loopback (64 KiB MSS,
    TCP_NODELAY) that is one segment, so the delta of this count is the number of Redis round trips.
    None when `ss` is missing."""
    exe = shutil.which("ss")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-tinpH", "state", "established", "dport", "=", f":{port}"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    wanted = {f"pid={p}," for p in pids}
    total, current = 0, False
    for line in out.splitlines():
        if line[:1].isspace():  # the info line of the socket above
            if current and (m := re.search(r"\bdata_segs_out:(\d+)", line)):
                total += int(m.group(1))
            continue
        current = any(w in line for w in wanted)
    return total


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (its children forked later inherit the mask)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass


class Child:
    """A server process with its output in bench-results/logs/<name>.log."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self, timeout: float = 30) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_until(check: Any, procs: list[Child], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited while waiting for {what}:\n{p.tail()}")
        if check():
            return
        time.sleep(0.3)
    raise RuntimeError(f"timed out waiting for {what}\n" + "\n".join(p.tail(1500) for p in procs))


class TgqStack:
    """Private redis-server + N workers (tgq's or the naive baseline) + the API, on loopback."""

    def __init__(self, args: argparse.Namespace, label: str, workers: int, threads: int, naive: bool = False) -> None:
        self.args, self.label, self.n_workers, self.threads, self.naive = args, label, workers, threads, naive
        self.redis_proc: subprocess.Popen | None = None
        self.redis_dir: Path | None = None
        self.workers: list[Child] = []
        self.api: Child | None = None
        self.url = ""
        self.redis: Any = None
        self.redis_port = 0
        self.metrics_ports: list[int] = []
        self.problems: list[str] = []  # e.g. a worker that died during a run

    def start(self) -> TgqStack:
        import redis
        from rq import Worker

        from common.serve import start_private_redis

        self.redis_proc, redis_url, self.redis_dir = start_private_redis()
        self.redis = redis.Redis.from_url(redis_url)
        self.redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        a = self.args
        logs = a.out / "logs"
        model_flags = ["--redis-url", redis_url, "--model", a.model]
        if a.cache_dir:
            model_flags += ["--cache-dir", a.cache_dir]
        for i in range(self.n_workers):
            worker_flags = model_flags + ["--device", a.device, "--dtype", a.dtype, "--threads", str(self.threads),
                                          "--max-batch-size", str(a.max_batch_size), "--name", f"{self.label}-{i}"]
            if getattr(a, "load_test_tokens_per_s", 0):  # worker/loadtest.py: no model, placeholder tokens
                worker_flags += ["--load-test-tokens-per-s", str(a.load_test_tokens_per_s)]
            if self.naive:
                cmd = [sys.executable, "-m", "bench.naive_worker", *worker_flags]
            else:
                self.metrics_ports.append(_free_port())
                cmd = [sys.executable, "-m", "common.cli", "worker", *worker_flags,
                       "--metrics-port", str(self.metrics_ports[-1])]
            self.workers.append(Child(f"{self.label}-worker{i}", cmd, logs))
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.api = Child(f"{self.label}-api", [sys.executable, "-m", "common.cli", "api", *model_flags, "--host",
                                               "127.0.0.1", "--port", str(port), "--workers", str(a.api_workers),
                                               "--max-queue-length",
                                               str(getattr(a, "max_queue_length", 1024))], logs)
        procs = [*self.workers, self.api]
        _wait_until(lambda: Worker.count(connection=self.redis) >= self.n_workers, procs, 600, "workers to register")
        _wait_until(lambda: _http_ok(self.url + "/health"), procs, 300, "the API's /health")
        if getattr(a, "pin_redis", None) is not None:
            self.pin(a.pin_redis)
        return self

    def pin(self, redis_cpu: int) -> None:
        """Redis alone on `redis_cpu`; the workers, the API (master and gunicorn workers) and this
        process (the clients) on the other CPUs."""
        import psutil

        pin(self.redis_proc.pid, {redis_cpu})
        rest = set(range(os.cpu_count() or 1)) - {redis_cpu} or {redis_cpu}
        for c in [*self.workers, self.api]:
            pin(c.pid, rest)
            for child in psutil.Process(c.pid).children(recursive=True):
                pin(child.pid, rest)
        pin(os.getpid(), rest)

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def peak_rss_mib(self) -> list[float | None]:
        return [None if (kb := proc_status_kb(pid)) is None else kb / 1024 for pid in self.worker_pids()]

    def round_trips(self) -> int | None:
        return tcp_data_segments_out(self.worker_pids(), self.redis_port)

    def worker_samples(self) -> list[dict] | None:
        """Each tgq worker's own /metrics (its --metrics-port), or None for the naive baseline."""
        if not self.metrics_ports:
            return None
        out = []
        for port in self.metrics_ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                    out.append(stats.parse_prometheus(resp.read().decode()))
            except (urllib.error.URLError, OSError):
                return None
        return out

    def redis_counters(self) -> dict[str, Any]:
        s = self.redis.info("stats")
        return {"commands": stats.commandstats_calls(self.redis.info("commandstats")),
                "reads": int(s.get("total_reads_processed", 0))}

    def cancel_leftovers(self) -> int:
        """Flag every queued or running job as cancelled (what a client's disconnect asks for).

        After a run cut at its deadline, the aborted streams' jobs may still sit in the queue: the API
        only notices a gone client when it next writes to it. Left there, they would eat into the
        next run."""
        from rq import Queue
        from rq.registry import StartedJobRegistry
        from rq.serializers import JSONSerializer

        from common import model_files, protocol

        queue = Queue(protocol.queue_name(model_files.resolve(self.args.model).model_id), connection=self.redis,
                      serializer=JSONSerializer)
        ids = list(queue.get_job_ids()) + list(StartedJobRegistry(queue=queue).get_job_ids())
        if ids:
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.set(protocol.cancel_key(job_id), b"1", ex=protocol.CANCEL_TTL_S)
            pipe.execute()
        return len(ids)

    def stop(self, errors: list[str] | None = None) -> None:
        if errors is not None:
            errors.extend(self.problems)
        if self.api is not None:
            self.api.stop(35)
        for w in self.workers:
            w.stop(40)
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.terminate()
            try:
                self.redis_proc.wait(5)
            except subprocess.TimeoutExpired:
                self.redis_proc.kill()
        if self.redis_dir is not None:
            shutil.rmtree(self.redis_dir, ignore_errors=True)


DEFAULT_LLAMA_SERVER = Path.home() / ".cache" / "tgq" / "llama.cpp" / "build" / "bin" / "llama-server"


class LlamaCppServer:
    """llama.cpp's server on one GGUF.

    With `binary` (llama.cpp's C++ `llama-server`, built by scripts/build_llama_server.sh): one slot
    per client (`-np`), continuous batching. Without: `python -m llama_cpp.server` from
    llama-cpp-python, which serves one request at a time (interrupt_requests off: it would abort
    concurrent streams)."""

    def __init__(self, args: argparse.Namespace, label: str, gguf: Path, binary: Path | None = None,
                 slots: int = 1) -> None:
        self.args, self.label, self.gguf = args, label, gguf
        self.binary, self.slots = binary, slots
        self.child: Child | None = None
        self.url = ""

    @property
    def batching(self) -> bool:
        return self.binary is not None

    def start(self) -> LlamaCppServer:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        n_ctx = max(2048, self.args.prompt_tokens + self.args.new_tokens + 64)
        threads = str(self.args.threads)
        if self.binary is not None:  # the context is split evenly between the slots
            cmd = [str(self.binary), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(port),
                   "-np", str(self.slots), "-c", str(self.slots * n_ctx), "-t", threads, "-tb", threads,
                   "--cont-batching", "--no-webui"]
            ready = "/health"
        else:
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--host", "127.0.0.1",
                   "--port", str(port), "--n_threads", threads, "--n_threads_batch", threads,
                   "--n_ctx", str(n_ctx), "--interrupt_requests", "False"]
            ready = "/v1/models"
        self.child = Child(self.label, cmd, self.args.out / "logs")
        _wait_until(lambda: _http_ok(self.url + ready), [self.child], 300, "llama.cpp's server")
        return self

    def peak_rss_mib(self) -> float | None:
        kb = proc_status_kb(self.child.pid) if self.child else None
        return None if kb is None else kb / 1024

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(15)


# ---- measurements --------------------------------------------------------------------------------


def require_device(device: str) -> None:
    """One line, not a traceback, when --device cuda is asked for where torch sees no GPU."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")


def save_results(res: dict[str, Any], path: Path | None, name: str, report: Callable[[dict[str, Any]], str]) -> Path:
    """Write a benchmark's results as JSON (default bench/results/<date>-<name>.json) and print its report."""
    path = path or ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}-{name}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(report(res))
    print(f"results: {path}")
    return path


def engine_bench_parser(prog: str, doc: str | None, *, pairs: int) -> argparse.ArgumentParser:
    """The options every in-process engine benchmark shares (bench.families, bench.paged, bench.structured)."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=(doc or "").split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=32, help="requests decoded together (B)")
    p.add_argument("--pairs", type=int, default=pairs)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default="")
    p.add_argument("--json", type=Path, default=None, help="write the results here (default: bench/results/)")
    return p


def engine_bench_main(args: argparse.Namespace, name: str, run: Callable[[argparse.Namespace], dict[str, Any]],
                      report: Callable[[dict[str, Any]], str]) -> int:
    require_device(args.device)
    save_results(run(args), args.json, name, report)
    return 0
