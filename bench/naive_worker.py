"""The one-request-at-a-time baseline: a worker that serves tgq's queue with plain `model.generate`.

It takes the same RQ jobs as `tgq worker` (same queue, same job payload, same RQ bookkeeping via
`worker.rq_worker.RedisJobs`) and publishes the same events, so it sits behind the same HTTP API;
the only difference is the engine: one request at a time, `model.generate` with a streamer that
publishes each token as it is produced (one Redis round trip per token: events, cancel flag,
lease renewal, batch metrics, exactly like one step of the batching engine with a single row).

    python -m bench.naive_worker --redis-url redis://127.0.0.1:6379/0 --model smollm2 --dtype bf16 --threads 2

This is a benchmark baseline, not a second server: it keeps what a simple HF server does (greedy or
seeded sampling through `generate`, EOS, max_new_tokens, stop sequences, cancellation, prompt
logprobs on request), and nothing clever.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from common.schemas import ErrorEvent, FinalEvent, FinishReason, PrefillToken, Token, TokenEvent

log = logging.getLogger("tgq.naive_worker")


class _Stop:
    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested


def _install_signals(stop: _Stop) -> None:
    def handler(signum: int, _frame: object) -> None:
        if stop.requested:
            os._exit(1)
        log.info("signal %d: finishing the current request, then exiting", signum)
        stop.requested = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


class NaiveRunner:
    """Runs one GenerationJob with `model.generate`, publishing through a RedisJobs sink."""

    def __init__(self, loaded: Any, jobs: Any, max_batch_size: int = 32) -> None:
        from common.metrics_spec import batch_size_buckets, bucket_index, duration_buckets

        self.loaded = loaded
        self.jobs = jobs
        self._dur_layout = duration_buckets()
        self._size_bucket = bucket_index(batch_size_buckets(max_batch_size), 1.0)
        self._bucket_index = bucket_index
        self._increments: dict[str, float] = {}
        jobs.take_metric_increments = self._take_increments  # flushed in the step pipeline, as the engine's

    def _take_increments(self) -> dict[str, float]:
        out, self._increments = self._increments, {}
        return out

    # ---- metrics in the Redis contract of common.metrics_spec (so the API's /metrics counts steps) ----
    def _count_step(self, method: str, seconds: float) -> None:
        inc = self._increments
        for name, amount in ((f"inference_count:{method}", 1), (f"inference_success:{method}", 1),
                             (f"inference_duration_bucket:{method}:{self._bucket_index(self._dur_layout, seconds)}", 1)):
            inc[name] = inc.get(name, 0) + amount
        key = f"inference_duration_sum:{method}"
        inc[key] = inc.get(key, 0.0) + float(seconds)

    def _count_batch(self) -> None:
        inc = self._increments
        for name in ("next_size_count", "next_size_sum", f"next_size_bucket:{self._size_bucket}"):
            inc[name] = inc.get(name, 0) + 1

    def _prefill_logprobs(self, job: Any) -> tuple:
        import torch


        tok = self.loaded.tokenizer
        ids = torch.tensor([list(job.input_ids)], device=self.loaded.device)
        with torch.inference_mode():
            logits = self.loaded.model(input_ids=ids).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        out = [PrefillToken(job.input_ids[0], tok.decode([job.input_ids[0]]), None)]
        for i in range(1, len(job.input_ids)):
            tid = job.input_ids[i]
            out.append(PrefillToken(tid, tok.decode([tid]), float(logprobs[i - 1, tid])))
        return tuple(out)

    def run(self, job: Any) -> None:
        import torch
        from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, \
            StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        loaded, jobs = self.loaded, self.jobs
        eos = loaded.eos_token_id
        sp, stopping = job.sampling, job.stopping
        started_at = time.time()
        state: dict[str, Any] = {"ids": [], "tokens": [], "text": "", "prefix": 0, "read": 0,
                                 "logprob": float("nan"), "halt": False, "final": None,
                                 "t_prev": time.perf_counter()}
        self._count_batch()
        prefill = self._prefill_logprobs(job) if job.want_prefill else ()

        class RecordLogprobs(LogitsProcessor):
            """Keeps the log-softmax of the final (processed) scores, to report the chosen token's logprob."""

            def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
                state["logprobs"] = torch.log_softmax(scores[0].float(), dim=-1)
                return scores

        class Halt(StoppingCriteria):
            def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
                return torch.full((input_ids.shape[0],), state["halt"], dtype=torch.bool, device=input_ids.device)

        runner = self

        class Publish(BaseStreamer):
            """generate() calls put() once with the prompt, then once per new token, before stopping checks."""

            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                runner._on_token(job, int(value.reshape(-1)[0]), state, started_at, prefill)

            def end(self) -> None:
                pass

        warpers: dict[str, Any] = {}
        if sp.sampling:  # TGI's 0 / 1.0 mean "off", as they do for transformers' warpers
            warpers = dict(temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, typical_p=sp.typical_p)
        config = GenerationConfig(max_new_tokens=stopping.max_new_tokens, do_sample=sp.sampling,
                                  repetition_penalty=sp.repetition_penalty, eos_token_id=eos,
                                  pad_token_id=eos if eos is not None else 0, **warpers)
        if sp.sampling:
            torch.manual_seed(sp.seed)
        input_ids = torch.tensor([list(job.input_ids)], device=loaded.device)
        state["t_prev"] = time.perf_counter()
        try:
            with torch.inference_mode():
                loaded.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      generation_config=config, streamer=Publish(),
                                      logits_processor=LogitsProcessorList([RecordLogprobs()]),
                                      stopping_criteria=StoppingCriteriaList([Halt()]))
        except Exception as exc:  # the row's generation failed: tell the client, fail the RQ job
            log.exception("generation failed for %s", job.request_id)
            err = ErrorEvent(job.request_id, job.attempt, f"generation failed: {exc}", "generation")
            try:
                jobs.step_done([err], [job])
            finally:
                jobs.finished([(job, err)])
            return
        # A final event was published (FinalEvent), or the client went away (None: RQ records it cancelled).
        jobs.finished([(job, state["final"])])

    def _on_token(self, job: Any, token_id: int, state: dict[str, Any], started_at: float, prefill: tuple) -> None:
        if state["halt"]:
            return  # generate() may sample once more after a stop we signalled; that token is not sent
        tok, loaded = self.loaded.tokenizer, self.loaded
        now = time.perf_counter()
        self._count_step("prefill" if not state["ids"] else "decode", now - state["t_prev"])
        state["ids"].append(token_id)
        ids = state["ids"]
        # Incremental detokenization (TGI's prefix/read offsets): hold back incomplete UTF-8.
        prefix_text = tok.decode(ids[state["prefix"]:state["read"]], skip_special_tokens=False)
        new_text = tok.decode(ids[state["prefix"]:], skip_special_tokens=False)
        text = ""
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            text = new_text[len(prefix_text):]
            state["prefix"], state["read"] = state["read"], len(ids)
        state["text"] += text
        logprobs = state.get("logprobs")
        lp = float(logprobs[token_id]) if logprobs is not None else float("nan")
        token = Token(token_id, text, lp, token_id in loaded.special_ids)
        if job.want_tokens:
            state["tokens"].append(token)
        index = len(ids) - 1
        reason = None
        if loaded.eos_token_id is not None and token_id == loaded.eos_token_id:
            reason = FinishReason.EOS_TOKEN
        elif any(s and state["text"].endswith(s) for s in job.stopping.stop):
            reason = FinishReason.STOP_SEQUENCE
        elif len(ids) >= job.stopping.max_new_tokens:
            reason = FinishReason.LENGTH
        if reason is None:
            event = TokenEvent(job.request_id, job.attempt, index, token)
        else:
            event = FinalEvent(
                request_id=job.request_id, attempt=job.attempt, index=index, token=token,
                generated_text=tok.decode(ids, skip_special_tokens=True), finish_reason=reason,
                generated_tokens=len(ids), seed=job.sampling.seed if job.sampling.sampling else None,
                started_at=started_at, finished_at=time.time(), tokens=tuple(state["tokens"]), prefill=prefill)
            state["final"] = event
            state["halt"] = True
        cancelled = self.jobs.step_done([event], [job])
        if job.request_id in cancelled and reason is None:
            state["halt"] = True
        state["t_prev"] = time.perf_counter()


def _parser() -> argparse.ArgumentParser:
    from common.settings import LimitSettings, ModelSettings, RedisSettings, WorkerSettings, add_cli_args

    p = argparse.ArgumentParser(prog="python -m bench.naive_worker",
                                description="one-request-at-a-time baseline worker (model.generate)")
    for cls in (RedisSettings, ModelSettings, LimitSettings, WorkerSettings):
        add_cli_args(p, cls)
    return p


def main(argv: list[str] | None = None) -> int:
    from common.settings import ModelSettings, RedisSettings, WorkerSettings, from_cli_args

    args = _parser().parse_args(argv)
    redis_settings = from_cli_args(RedisSettings, args)
    model_settings = from_cli_args(ModelSettings, args)
    settings = from_cli_args(WorkerSettings, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = _Stop()
    _install_signals(stop)

    from rq import Queue
    from rq.exceptions import DequeueTimeout
    from rq.serializers import JSONSerializer

    from common import model_files, protocol
    from common.redis_client import connect
    from worker.model import load_model
    from worker.rq_worker import BatchWorker, RedisJobs

    source = model_files.resolve(model_settings.model, model_settings.model_id)
    t0 = time.monotonic()
    loaded = load_model(source, model_settings.cache_dir, settings.device, settings.dtype, settings.threads,
                        rows_hint=settings.max_batch_size, fused=False)  # model.generate: transformers' forward
    log.info("model %s loaded in %.1f s (%s, %s)", source.model_id, time.monotonic() - t0, settings.device,
             settings.dtype)
    connection = connect(redis_settings)
    queue = Queue(protocol.queue_name(source.model_id), connection=connection, serializer=JSONSerializer)
    name = settings.name or f"naive.{socket.gethostname()}.{os.getpid()}"
    rq_worker = BatchWorker([queue], connection=connection, name=name, serializer=JSONSerializer)
    rq_worker.lease_ttl = settings.lease_ttl
    rq_worker.register_birth()
    jobs = RedisJobs(connection, rq_worker, queue, source.model_id, max_attempts=settings.max_attempts)
    runner = NaiveRunner(loaded, jobs, settings.max_batch_size)
    batch_key = protocol.worker_batch_key(source.model_id, name)
    log.info("naive worker %s listening on %s (one request at a time)", name, queue.name)
    try:
        while not stop():
            try:
                jobs.wait(1.0)
            except DequeueTimeout:  # rq 3 raises it when a blocking dequeue finds nothing
                rq_worker.heartbeat()
            if stop():
                break
            for job in jobs.fetch(1):
                runner.run(job)
                connection.set(batch_key, 0, ex=10)
    finally:
        jobs.give_back(list(j.job for j in jobs.held.values()))
        jobs.close()
        rq_worker.register_death()
        log.info("naive worker %s stopped", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
