"""The graph-capturable decode step (worker/graphs.py) computes what the ordinary forward computes.

Here it runs eagerly (`capture=False`); tests/unit/test_engine_cuda.py replays it as CUDA graphs."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from common.settings import WorkerSettings
from worker.graphs import DecodeGraphs, bucket_for

from .test_engine import PROMPTS, generated_ids, job, run_engine


@pytest.mark.parametrize("rows, capacity, padded", [
    (1, 32, 1), (3, 32, 4), (5, 32, 8), (17, 32, 24), (25, 32, 32), (32, 32, 32),
    (33, 64, 48), (49, 64, 64), (30, 28, 30), (5, 6, 5), (40, 40, 40),
])
def test_rows_are_padded_to_a_bucket_within_the_buffers_capacity(rows, capacity, padded):
    assert bucket_for(rows, capacity) == padded


SLOT = WorkerSettings(max_batch_size=8, waiting_served_ratio=0.0, kv_cache="slot")  # these graphs' cache


def _with_in_place_decode(loaded):
    graphs = DecodeGraphs(loaded.fast, loaded.model.get_output_embeddings(), capture=False)
    return dataclasses.replace(loaded, graphs=graphs)


def _arrivals():
    # Rows of different lengths join at different steps and leave at different steps; "long" outgrows
    # the KV buffers' spare columns, so they are reallocated while it runs.
    return {0: [job("r0", PROMPTS[0], n=6), job("r1", PROMPTS[1], n=9), job("long", PROMPTS[2], n=45)],
            2: [job("r2", PROMPTS[3], n=12)], 5: [job("r3", PROMPTS[0], n=3), job("r4", PROMPTS[1], n=20)]}


def test_in_place_decode_gives_the_ordinary_forwards_tokens_and_logprobs(tiny_loaded):
    in_place = _with_in_place_decode(tiny_loaded)
    made = []  # (padded rows, buffer columns) of every step layout the decode set up
    new_step = in_place.graphs._new_step
    in_place.graphs._new_step = lambda padded, layer: made.append((padded, layer.kbuf.shape[2])) or \
        new_step(padded, layer)
    _, _, want = run_engine(tiny_loaded, _arrivals(), settings=SLOT)
    _, _, got = run_engine(in_place, _arrivals(), settings=SLOT)
    for rid, n in (("r0", 6), ("r1", 9), ("long", 45), ("r2", 12), ("r3", 3), ("r4", 20)):
        assert len(generated_ids(got, rid)) == n
        assert generated_ids(got, rid) == generated_ids(want, rid), rid
        a = [e.token.logprob for e in want.events_for(rid)]
        b = [e.token.logprob for e in got.events_for(rid)]
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5), rid
    # Padding rows ran (3 and then 5 live rows in buckets of 4 and 8), and the buffers were reallocated
    # while rows decoded (new column counts), each time with fresh step layouts.
    assert {4, 8} <= {rows for rows, _ in made} <= {1, 2, 4, 8}
    assert len({columns for _, columns in made}) >= 2


def test_positions_past_the_rotary_tables_take_the_ordinary_forward(tiny_loaded):
    graphs = DecodeGraphs(tiny_loaded.fast, tiny_loaded.model.get_output_embeddings(), capture=False)
    from worker.kvcache import SlotCache

    cache = SlotCache(len(tiny_loaded.fast.layers))
    ids = torch.tensor([[5], [6]])
    cache.layers[0].end = 1  # a non-empty window, as after a prefill
    short = torch.ones(2, 1, 1, 3, dtype=torch.bool)
    long = torch.ones(2, 1, 1, tiny_loaded.fast.rope_positions + 1, dtype=torch.bool)
    assert graphs.accepts(ids, short, cache)
    assert not graphs.accepts(ids, long, cache)
    assert not graphs.accepts(torch.tensor([[5, 6]]), short, cache)  # a prefill


def test_padding_rows_leave_only_finite_values_in_the_kv_buffers(tiny_loaded):
    """Free slots may later sit under a masked column of a live row: -inf masks NaN away only if finite."""
    in_place = _with_in_place_decode(tiny_loaded)
    eng, _, _ = run_engine(in_place, {0: [job(f"p{i}", PROMPTS[i], n=10) for i in range(3)]}, settings=SLOT, max_steps=4)
    layers = eng.batch.cache.slot_layers
    assert layers[0].rows == 3 and layers[0].kbuf.shape[0] >= 4  # a padding row was written
    for layer in layers:
        assert torch.isfinite(layer.kbuf).all() and torch.isfinite(layer.vbuf).all()
