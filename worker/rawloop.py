"""Throughput yardsticks: the bare batched greedy loop (no serving) and the engine on the same workload."""
from __future__ import annotations

import time

import torch

from common.schemas import GenerationJob, SamplingParams, StoppingParams
from common.settings import LimitSettings, WorkerSettings

from .model import LoadedModel


def _prompts(loaded: LoadedModel, batch_size: int, prompt_len: int, seed: int = 0) -> torch.Tensor:
    # Ordinary ids (above the specials) so the workload looks like text to the model.
    g = torch.Generator().manual_seed(seed)
    low = max(loaded.special_ids, default=-1) + 1
    return torch.randint(low, loaded.vocab_size, (batch_size, prompt_len), generator=g)


@torch.inference_mode()
def raw_decode_tokps(loaded: LoadedModel, batch_size: int, new_tokens: int, prompt_len: int) -> float:
    """Aggregate decode tokens/s of the plain HF forward loop (DynamicCache, argmax), prefill excluded."""
    model = loaded.model
    ids = _prompts(loaded, batch_size, prompt_len).to(loaded.device)
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    cache = out.cache
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        out = model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        nxt.tolist()  # the host sync a server needs every step anyway
    return batch_size * new_tokens / (time.perf_counter() - t0)


class _ListSource:
    def __init__(self, jobs: list[GenerationJob]) -> None:
        self.jobs = jobs

    def fetch(self, max_jobs: int) -> list[GenerationJob]:
        out, self.jobs = self.jobs[:max_jobs], self.jobs[max_jobs:]
        return out

    def wait(self, timeout: float) -> None:
        return None

    def give_back(self, jobs: list[GenerationJob]) -> None:
        return None


class _NullSink:
    def step_done(self, events: list, running: list) -> set[str]:
        return set()

    def finished(self, leaving: list) -> None:
        return None


def engine_decode_tokps(loaded: LoadedModel, batch_size: int, new_tokens: int, prompt_len: int,
                        sampling: SamplingParams | None = None) -> float:
    """Aggregate decode tokens/s of the Engine on the raw loop's workload (all rows admitted at once)."""
    from .engine import Engine

    prompts = _prompts(loaded, batch_size, prompt_len).tolist()
    params = sampling or SamplingParams()
    jobs = [GenerationJob(f"bench-{i}", tuple(p), params, StoppingParams(max_new_tokens=new_tokens + 1), "")
            for i, p in enumerate(prompts)]
    settings = WorkerSettings(max_batch_size=batch_size, max_batch_prefill_tokens=batch_size * prompt_len)
    limits = LimitSettings(max_input_length=prompt_len + 1, max_total_tokens=prompt_len + new_tokens + 2)
    engine = Engine(loaded, settings, limits, _ListSource(jobs), _NullSink())
    engine.step()  # prefill (and the first decode step)
    if engine.batch is None or len(engine.batch) != batch_size:
        raise RuntimeError("the benchmark batch did not form in one step")
    t0 = time.perf_counter()
    steps = 0
    while engine.batch is not None:
        engine.step()
        steps += 1
    return batch_size * steps / (time.perf_counter() - t0)
