"""`tgq` command line: `serve`, `api`, `worker`, `bench`.

Flags are resolved here, once, into frozen settings objects that are passed down; a flag the
process cannot run with (a wrong `--model` included) ends it with one line, `tgq: error: ...`, and
exit status 2. The heavy
packages (flask for the API, torch for the worker) are imported only by the subcommand that
needs them.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .model_files import ModelNotFound
from .settings import (ApiSettings, LimitSettings, ModelSettings, RedisSettings, ServedModelsSettings,
                       SettingsError, WorkerSettings, add_cli_args, from_cli_args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tgq", description="TGI-compatible text generation over Redis")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="redis (private, unless --redis-url) + one worker per model + the API")
    for cls in (ServedModelsSettings, LimitSettings, ApiSettings, WorkerSettings):
        add_cli_args(serve, cls)
    serve.add_argument("--redis-url", default=None,
                       help="use this Redis instead of starting a private redis-server [env TGQ_REDIS_URL]")

    api = sub.add_parser("api", help="the HTTP API under gunicorn (gevent)")
    for cls in (RedisSettings, ServedModelsSettings, LimitSettings, ApiSettings):
        add_cli_args(api, cls)

    worker = sub.add_parser("worker", help="one worker process with the model loaded")
    for cls in (RedisSettings, ModelSettings, LimitSettings, WorkerSettings):
        add_cli_args(worker, cls)

    status = sub.add_parser("status", help="queues and workers as Redis sees them (like `rq info`)")
    add_cli_args(status, RedisSettings)
    status.add_argument("--json", action="store_true", help="one JSON object per reading")
    status.add_argument("--watch", type=float, nargs="?", const=2.0, default=0.0,
                        help="refresh every WATCH seconds (2 when given alone) until interrupted")

    bench = sub.add_parser("bench", help="load generator against a running server")
    bench.add_argument("--url", default="http://127.0.0.1:3000")
    bench.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    bench.add_argument("--prompt-tokens", type=int, default=32, help="approximate prompt length")
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--requests", type=int, default=0, help="stop after this many requests (0: use --duration)")
    bench.add_argument("--duration", type=float, default=30.0, help="seconds to run when --requests is 0")
    bench.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    bench.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    bench.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "api":
            from api.server import run_api

            return run_api(from_cli_args(RedisSettings, args), from_cli_args(ServedModelsSettings, args),
                           from_cli_args(LimitSettings, args), from_cli_args(ApiSettings, args))
        if args.command == "worker":
            from worker.main import run_worker

            return run_worker(from_cli_args(RedisSettings, args), from_cli_args(ModelSettings, args),
                              from_cli_args(LimitSettings, args), from_cli_args(WorkerSettings, args))
        if args.command == "serve":
            from .serve import run_serve

            redis_url = args.redis_url or os.environ.get("TGQ_REDIS_URL") or None
            return run_serve(redis_url, from_cli_args(ServedModelsSettings, args), from_cli_args(LimitSettings, args),
                             from_cli_args(ApiSettings, args), from_cli_args(WorkerSettings, args))
        if args.command == "status":
            from .redis_client import connect
            from .status import run_status

            return run_status(connect(from_cli_args(RedisSettings, args)), as_json=args.json, watch=args.watch)
        if args.command == "bench":
            from bench.client import run_bench

            return run_bench(args)
    except (SettingsError, ModelNotFound) as exc:  # a wrong flag: one line, no traceback
        print(f"tgq: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
