"""The engine on CUDA runs the same code as on CPU (skipped where no GPU is present, as in CI here).

On a GPU machine: `python -m pytest tests/unit/test_engine_cuda.py`."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from common.model_files import resolve
from tests.support.tiny_families import build_family_model, family_configs
from worker.graphs import DecodeGraphs
from worker.model import load_model
from worker.models import FAMILIES

from .test_engine import PROMPTS, generated_ids, job, run_engine
from .test_graphs import _arrivals as _growing_arrivals

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_fp32(tiny_model_dir):
    return load_model(resolve(str(tiny_model_dir)), "", "cuda", "fp32", 1)


@pytest.fixture(scope="module")
def cuda_bf16(tiny_model_dir):
    return load_model(resolve(str(tiny_model_dir)), "", "cuda", "bf16", 1)


def _arrivals():
    return {0: [job("r0", PROMPTS[0], n=6), job("r1", PROMPTS[1], n=8)],
            2: [job("r2", PROMPTS[2], n=10)], 5: [job("r3", PROMPTS[3], n=12)]}


def test_fused_forward_and_decode_graphs_are_used_on_cuda_in_both_dtypes(cuda_fp32, cuda_bf16):
    for loaded in (cuda_fp32, cuda_bf16):
        assert loaded.device.type == "cuda"
        assert loaded.fast is not None  # it matched transformers' logits on the GPU too
        assert loaded.graphs is not None and loaded.graphs.capture
        assert next(loaded.model.parameters()).is_cuda


def test_cuda_greedy_tokens_equal_the_cpu_ones_and_do_not_depend_on_the_batch(cuda_fp32, tiny_loaded):
    captured = cuda_fp32.graphs.captures
    _, _, on_gpu = run_engine(cuda_fp32, _arrivals())
    assert cuda_fp32.graphs.captures > captured and cuda_fp32.graphs.capture  # replayed graphs, no fallback
    _, _, on_cpu = run_engine(tiny_loaded, _arrivals())
    for i, p in enumerate(PROMPTS):
        rid = f"r{i}"
        _, _, alone = run_engine(cuda_fp32, {0: [job(rid, p, n=6 + 2 * i)]})
        assert len(generated_ids(on_gpu, rid)) == 6 + 2 * i
        assert generated_ids(on_gpu, rid) == generated_ids(alone, rid) == generated_ids(on_cpu, rid), rid


def test_cuda_bf16_serves_mixed_sampling_rows_and_seeds_repeat(cuda_bf16):
    params = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.2, seed=77)
    _, _, alone = run_engine(cuda_bf16, {0: [job("s", PROMPTS[0], n=10, **params)]})
    _, _, again = run_engine(cuda_bf16, {0: [job("s", PROMPTS[0], n=10, **params)]})
    arrivals = {0: [job("g", PROMPTS[1], n=12), job("w", PROMPTS[2], n=8, watermark=True, do_sample=True, seed=3)],
                1: [job("s", PROMPTS[0], n=10, **params), job("t", PROMPTS[3], n=9, typical_p=0.9, do_sample=True,
                                                                 seed=5)]}
    _, _, mixed = run_engine(cuda_bf16, arrivals)
    assert len(generated_ids(alone, "s")) == 10
    assert generated_ids(alone, "s") == generated_ids(again, "s")
    assert [len(generated_ids(mixed, r)) for r in "gwst"] == [12, 8, 10, 9]
    assert mixed.result("s").seed == 77


def test_replayed_graphs_compute_exactly_what_the_eager_step_computes(cuda_bf16):
    """bf16, rows joining and leaving (buffers reallocated as they join): graph replays against the same
    step run eagerly (same kernels, so the same bits)."""
    eager = dataclasses.replace(cuda_bf16, graphs=DecodeGraphs(cuda_bf16.fast, cuda_bf16.model.get_output_embeddings(), None,
                                                               capture=False))
    captured = cuda_bf16.graphs.captures
    _, _, want = run_engine(eager, _growing_arrivals())
    _, _, got = run_engine(cuda_bf16, _growing_arrivals())
    assert cuda_bf16.graphs.captures > captured and cuda_bf16.graphs.capture
    for rid in ("r0", "r1", "long", "r2", "r3", "r4"):
        assert generated_ids(got, rid) == generated_ids(want, rid), rid
        assert [e.token.logprob for e in got.events_for(rid)] == [e.token.logprob for e in want.events_for(rid)]


@pytest.fixture(scope="module", params=sorted(family_configs()))
def cuda_family(request, tmp_path_factory):
    """(model_type, its tiny checkpoint loaded on CUDA in fp32, in bf16, and on CPU in fp32)."""
    path = build_family_model(request.param, tmp_path_factory.mktemp(f"cuda-{request.param}"))
    return (request.param, load_model(resolve(str(path)), "", "cuda", "fp32", 1),
            load_model(resolve(str(path)), "", "cuda", "bf16", 1), load_model(resolve(str(path)), "", "cpu", "fp32", 1))


def test_every_family_runs_fused_with_decode_graphs_on_cuda(cuda_family):
    kind, fp32, bf16, _ = cuda_family
    for loaded in (fp32, bf16):
        assert type(loaded.fast) is FAMILIES[kind]
        assert loaded.graphs is not None and loaded.graphs.capture


def test_every_familys_cuda_greedy_tokens_equal_the_cpu_ones_alone_and_batched(cuda_family):
    kind, fp32, _, cpu = cuda_family
    _, _, on_gpu = run_engine(fp32, _arrivals())
    assert fp32.graphs.captures > 0 and fp32.graphs.capture
    _, _, on_cpu = run_engine(cpu, _arrivals())
    for i, p in enumerate(PROMPTS):
        rid = f"r{i}"
        _, _, alone = run_engine(fp32, {0: [job(rid, p, n=6 + 2 * i)]})
        assert generated_ids(on_gpu, rid) == generated_ids(alone, rid) == generated_ids(on_cpu, rid), (kind, rid)


def test_every_familys_replayed_graphs_compute_what_its_eager_step_computes(cuda_family):
    kind, _, bf16, _ = cuda_family
    eager = dataclasses.replace(bf16, graphs=DecodeGraphs(bf16.fast, bf16.model.get_output_embeddings(),
                                                          bf16.fast.final_softcap, capture=False))
    _, _, want = run_engine(eager, _growing_arrivals())
    _, _, got = run_engine(bf16, _growing_arrivals())
    for rid in ("r0", "r1", "long", "r2", "r3", "r4"):
        assert generated_ids(got, rid) == generated_ids(want, rid), (kind, rid)


def test_every_familys_paged_decode_graphs_give_the_cpu_tokens(cuda_family):
    """The paged KV cache on CUDA: decode steps replayed as graphs through the block tables."""
    from common.settings import WorkerSettings

    kind, fp32, _, cpu = cuda_family
    paged = WorkerSettings(max_batch_size=8, waiting_served_ratio=0.0, kv_cache="paged", kv_block_size=4)
    captured = fp32.paged_graphs.captures
    eng, _, on_gpu = run_engine(fp32, _arrivals(), settings=paged)
    assert fp32.paged_graphs.captures > captured and fp32.paged_graphs.capture
    _, _, on_cpu = run_engine(cpu, _arrivals(), settings=paged)
    for i in range(len(PROMPTS)):
        assert generated_ids(on_gpu, f"r{i}") == generated_ids(on_cpu, f"r{i}"), (kind, i)
    assert eng.blocks.free_blocks == eng.blocks.num_blocks
