"""Settings for every tgq process, resolved once at the entry point.

Each field of a settings dataclass is a command-line flag (`--max-batch-size`) whose default comes
from the environment variable `TGQ_<FLAG>` (`TGQ_MAX_BATCH_SIZE`) and then from the field default.
Nothing here reads the environment at import time: `add_cli_args` reads it when a parser is built.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

T = TypeVar("T")

ENV_PREFIX = "TGQ_"


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


def _many(default: tuple[str, ...], help: str) -> Any:
    """A repeatable flag (`--model A --model B`); its variable holds a comma-separated list."""
    return field(default=default, metadata={"help": help, "choices": None, "many": True})


class _Append(argparse.Action):
    """Collects a repeatable flag's values; the first use replaces the default instead of adding to it."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        current = getattr(ns, self.dest)
        setattr(ns, self.dest, (*(() if current is self.default else current), values))


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _field_type(f: dataclasses.Field) -> type:
    # `from __future__ import annotations` makes f.type a string.
    name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
    name = name.replace(" | None", "").replace("Optional[", "").rstrip("]")
    return {"int": int, "float": float, "bool": bool}.get(name, str)


def add_cli_args(parser: argparse.ArgumentParser, cls: type, environ: Mapping[str, str] | None = None) -> None:
    """Add one flag per field of `cls`; defaults come from `TGQ_<FLAG>` in `environ`, then the field."""
    env = os.environ if environ is None else environ
    for f in dataclasses.fields(cls):
        flag = f.name.replace("_", "-")
        env_name = ENV_PREFIX + f.name.upper()
        kind = _field_type(f)
        many = bool(f.metadata.get("many"))
        default = f.default
        if env_name in env:
            raw = env[env_name]
            if many:
                default = tuple(x.strip() for x in raw.split(",") if x.strip())
            else:
                default = _parse_bool(raw) if kind is bool else kind(raw)
        help_text = f"{f.metadata.get('help', '')} [env {env_name}; default: {default!r}]"
        if many:
            parser.add_argument(f"--{flag}", dest=f.name, action=_Append, default=default, help=help_text)
        elif kind is bool:
            parser.add_argument(f"--{flag}", dest=f.name, type=_parse_bool, nargs="?", const=True,
                                default=default, help=help_text)
        else:
            parser.add_argument(f"--{flag}", dest=f.name, type=kind, default=default,
                                choices=f.metadata.get("choices"), help=help_text)


def from_cli_args(cls: type[T], ns: argparse.Namespace) -> T:
    """Build `cls` from the parsed flags that belong to it."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def from_env(cls: type[T], environ: Mapping[str, str] | None = None) -> T:
    """Build `cls` from `TGQ_*` variables alone (for processes started without flags, e.g. gunicorn)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_cli_args(parser, cls, environ)
    return from_cli_args(cls, parser.parse_args([]))


class SettingsError(ValueError):
    """A setting has a value the process cannot run with."""


@dataclass(frozen=True)
class RedisSettings:
    redis_url: str = _opt("redis://127.0.0.1:6379/0",
                          "Redis URL; rediss:// for TLS, redis://:password@host:port/db for a password")


@dataclass(frozen=True)
class ModelSettings:
    model: str = _opt("smollm2", "'smollm2' (SmolLM2-135M-Instruct), a local HF model directory, a .gguf file or a "
                                 "Hugging Face Hub id org/name[@revision] (in huggingface_hub's cache; "
                                 "HF_HUB_OFFLINE=1: the cache alone)")
    model_id: str = _opt("", "name used for the queue (tgq:<model-id>); derived from --model when empty (a Hub "
                             "id: org/name, whatever the revision)")
    cache_dir: str = _opt("", "where converted GGUF models are cached; default ~/.cache/tgq")


@dataclass(frozen=True)
class ServedModelsSettings:
    """The models an API (or `tgq serve`) serves; `--model` and `--model-id` pair up by position."""
    model: tuple[str, ...] = _many(("smollm2",), "a model to serve (repeatable; the first is the default): 'smollm2', "
                                                 "a local HF model directory, a .gguf file or a Hugging Face Hub id "
                                                 "org/name[@revision]")
    model_id: tuple[str, ...] = _many((), "the id of the --model at the same position (repeatable); derived from "
                                          "--model when missing")
    cache_dir: str = _opt("", "where converted GGUF models are cached; default ~/.cache/tgq")

    def __post_init__(self) -> None:
        if not self.model:
            raise SettingsError("at least one `--model` is needed")
        if len(self.model_id) > len(self.model):
            raise SettingsError("more `--model-id` than `--model` flags")
        ids = [i for i in self.model_id if i]
        if len(set(ids)) != len(ids):
            raise SettingsError("`--model-id` values must differ")

    def entries(self) -> list[ModelSettings]:
        """One ModelSettings per served model, in order."""
        ids = (*self.model_id, *([""] * (len(self.model) - len(self.model_id))))
        return [ModelSettings(model=m, model_id=i, cache_dir=self.cache_dir) for m, i in zip(self.model, ids)]


@dataclass(frozen=True)
class LimitSettings:
    """TGI 0.5.0's request limits (router flags), enforced by the API and sized for by the worker."""
    max_input_length: int = _opt(1000, "maximum prompt tokens")
    max_total_tokens: int = _opt(1512, "maximum prompt + new tokens")
    max_best_of: int = _opt(2, "maximum best_of")
    max_stop_sequences: int = _opt(4, "maximum number of stop sequences")
    max_queue_length: int = _opt(128, "answer 429 when this many jobs are waiting in Redis")

    def __post_init__(self) -> None:
        if self.max_input_length >= self.max_total_tokens:
            raise SettingsError("`max_input_length` must be < `max_total_tokens`")
        for name in ("max_input_length", "max_best_of", "max_queue_length"):
            if getattr(self, name) < 1:
                raise SettingsError(f"`{name}` must be >= 1")
        if self.max_stop_sequences < 0:
            raise SettingsError("`max_stop_sequences` must be >= 0")


@dataclass(frozen=True)
class ApiSettings:
    host: str = _opt("0.0.0.0", "address to bind")
    port: int = _opt(3000, "port to bind")
    workers: int = _opt(2, "gunicorn (gevent) worker processes")
    api_key: str = _opt("", "when set, generation routes need 'Authorization: Bearer <key>'")
    cors_allow_origin: str = _opt("", "comma-separated allowed origins; empty allows any origin")
    max_body_bytes: int = _opt(2_000_000, "largest accepted request body")
    request_timeout: float = _opt(600.0, "seconds a request may wait for its result before 500")
    graceful_timeout: int = _opt(30, "on SIGTERM: stop accepting, give open requests (streams) "
                                         "this many seconds to finish, then close them")
    max_n: int = _opt(8, "most choices (`n`) one /v1 request may ask for")

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise SettingsError("`port` must be in 1..65535")
        if self.workers < 1 or self.max_n < 1:
            raise SettingsError("`workers` and `max_n` must be >= 1")
        if self.graceful_timeout < 0 or self.request_timeout <= 0:
            raise SettingsError("`graceful_timeout` must be >= 0 and `request_timeout` > 0")


@dataclass(frozen=True)
class WorkerSettings:
    device: str = _opt("cpu", "torch device", choices=("cpu", "cuda"))
    dtype: str = _opt("bf16", "weights and activations dtype", choices=("bf16", "fp16", "fp32"))
    max_batch_size: int = _opt(32, "most rows decoded together")
    threads: int = _opt(0, "torch intra-op threads (0: torch's default)")
    fused_forward: bool = _opt(True, "run models of the families in worker/models/ through tgq's fused forward (used "
                                     "only if it matches transformers' logits at load); false: transformers' forward")
    cuda_graphs: bool = _opt(True, "on CUDA, replay decode steps of the fused forward as CUDA graphs (captured per "
                                   "padded batch size and KV-buffer size)")
    cpu_kernels: bool = _opt(True, "on an AVX-512 CPU in bf16, run the fused forward's decode attention, residual "
                                   "adds with norms, rotary embedding and greedy choice as C++ kernels (compiled "
                                   "once into the cache with g++, or $CXX; torch's ops without a compiler)")
    kv_cache: str = _opt("auto", "KV cache layout: 'paged' (fixed-size blocks in one pool, per-row block tables; "
                                 "needed for --prefix-cache; fused forward only), 'slot' (dense per-batch buffers), "
                                 "or 'auto': paged where a compiled decode attention reads its blocks (a CPU "
                                 "with a C++ compiler), slot elsewhere (CUDA: not yet measured; torch's ops: "
                                 "measured slower)",
                         choices=("auto", "slot", "paged"))
    prefix_cache: bool = _opt(True, "with --kv-cache paged: reuse the keys and values of cached prompt prefixes "
                                    "(system prompts, earlier turns) instead of recomputing them")
    kv_block_size: int = _opt(16, "tokens per block of the paged KV cache")
    prefix_cache_tokens: int = _opt(8192, "KV slots the paged cache holds beyond the running batch's token budget, "
                                          "for cached prefixes (least recently used go first)")
    max_batch_total_tokens: int = _opt(0, "token budget of the running batch (0: max_batch_size * max_total_tokens)")
    max_batch_prefill_tokens: int = _opt(4096, "most prompt tokens admitted (and prefilled) at once")
    prefill_chunk_tokens: int = _opt(512, "while rows decode, most prompt tokens prefilled between two decode "
                                          "steps (0: whole prompts in one go)")
    waiting_served_ratio: float = _opt(1.2, "admit waiting jobs while a batch runs once waiting >= ratio * running")
    max_waiting_tokens: int = _opt(20, "decode steps after which waiting jobs are admitted regardless")
    metrics_port: int = _opt(0, "port for this worker's Prometheus metrics (0: none)")
    name: str = _opt("", "worker name in RQ (default: host.pid)")
    lease_ttl: int = _opt(15, "seconds a job stays leased without renewal before another process re-queues it")
    max_attempts: int = _opt(3, "runs of a job (first + re-runs after worker deaths) before it fails")
    grace_period: float = _opt(30.0, "on SIGTERM: seconds to finish the running batch before handing it back")
    orphan_grace_s: float = _opt(12.0, "seconds a reply channel may have no subscriber (its API process gone) before "
                                       "the rows replying to it are dropped and recorded as canceled; longer than a "
                                       "Redis blip, a resubscription or a Sentinel failover")
    load_test_tokens_per_s: float = _opt(0.0, "LOAD TESTING ONLY: load no model; emit placeholder tokens at this rate "
                                              "per row through the real protocol (0: off, the real model runs)")

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise SettingsError("`max_batch_size` must be >= 1")
        if self.threads < 0:
            raise SettingsError("`threads` must be >= 0")
        if self.max_batch_prefill_tokens < 1:
            raise SettingsError("`max_batch_prefill_tokens` must be >= 1")
        if self.prefill_chunk_tokens < 0:
            raise SettingsError("`prefill_chunk_tokens` must be >= 0")
        if self.kv_block_size < 1 or self.prefix_cache_tokens < 0:
            raise SettingsError("`kv_block_size` must be >= 1 and `prefix_cache_tokens` >= 0")
        if self.lease_ttl < 2 or self.max_attempts < 1:
            raise SettingsError("`lease_ttl` must be >= 2 and `max_attempts` >= 1")
        if self.waiting_served_ratio < 0:
            raise SettingsError("`waiting_served_ratio` must be >= 0")
        if self.orphan_grace_s <= 0 or self.load_test_tokens_per_s < 0:
            raise SettingsError("`orphan_grace_s` must be > 0 and `load_test_tokens_per_s` >= 0")


def to_cli_args(settings: Any) -> list[str]:
    """The flags that rebuild `settings` in a child process (`tgq serve` starts `tgq api`/`tgq worker`)."""
    args: list[str] = []
    for f in dataclasses.fields(settings):
        flag, value = f"--{f.name.replace('_', '-')}", getattr(settings, f.name)
        for item in (value if f.metadata.get("many") else (value,)):
            args += [flag, str(item)]
    return args
