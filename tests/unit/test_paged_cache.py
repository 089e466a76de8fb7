"""The paged KV cache (worker/paged/) in the engine: the same tokens as the slot cache, for every family,
and prefix caching that changes nothing but what is computed."""
from __future__ import annotations

import dataclasses

import torch

from common.settings import WorkerSettings

from .test_engine import generated_ids, job, run_engine

PAGED = WorkerSettings(max_batch_size=8, waiting_served_ratio=0.0, kv_cache="paged", kv_block_size=4)
NO_PREFIX = dataclasses.replace(PAGED, prefix_cache=False)
SLOT = WorkerSettings(max_batch_size=8, waiting_served_ratio=0.0)
SYSTEM = list(range(3000, 3023))  # a 23-token shared prefix: 5 full blocks of 4, then 3 more
PROMPTS = [[5, 900, 33], [17, 2000, 3000, 44, 45, 46, 47, 48, 49], list(range(1000, 1021)), [100, 200, 300, 400, 500]]


def _arrivals():
    # Rows join at different steps, leave at different steps, and outgrow the 8-token windows.
    return {0: [job("r0", PROMPTS[0], n=6), job("r1", PROMPTS[1], n=9), job("long", PROMPTS[2], n=30)],
            2: [job("r2", PROMPTS[3], n=12)], 5: [job("r3", PROMPTS[0], n=3), job("r4", PROMPTS[1], n=20)]}


def _tokens(sink, rids=("r0", "r1", "long", "r2", "r3", "r4")):
    return {rid: generated_ids(sink, rid) for rid in rids}


def test_the_paged_cache_gives_the_slot_caches_tokens_and_frees_every_block(family):
    kind, _, loaded = family
    _, _, slot = run_engine(loaded, _arrivals(), settings=SLOT)
    eng, _, paged = run_engine(loaded, _arrivals(), settings=PAGED)
    assert _tokens(paged) == _tokens(slot), kind
    assert [len(t) for t in _tokens(paged).values()] == [6, 9, 30, 12, 3, 20]
    for rid in ("r1", "long"):
        a = torch.tensor([e.token.logprob for e in slot.events_for(rid)])
        b = torch.tensor([e.token.logprob for e in paged.events_for(rid)])
        assert torch.allclose(a, b, atol=1e-4), (kind, rid)
    assert eng.blocks.free_blocks == eng.blocks.num_blocks


def test_chunked_prefill_into_the_paged_cache_while_rows_decode(family):
    kind, _, loaded = family
    chunked = dataclasses.replace(PAGED, prefill_chunk_tokens=5)
    arrivals = lambda: {0: [job("a", PROMPTS[0], n=12)], 2: [job("b", PROMPTS[2], n=8), job("c", PROMPTS[1], n=6)]}
    _, _, want = run_engine(loaded, arrivals(), settings=SLOT)
    _, _, got = run_engine(loaded, arrivals(), settings=chunked)
    assert _tokens(got, "abc") == _tokens(want, "abc"), kind


def test_prefix_cache_hits_leave_the_greedy_tokens_unchanged(family):
    """Requests share a system prompt, one arriving after the first finished (its blocks freed but still
    registered), one while it runs, and a later turn repeats a whole earlier prompt."""
    kind, _, loaded = family
    first = SYSTEM + [11, 12, 13]
    arrivals = lambda: {0: [job("a", first, n=5)], 8: [job("b", SYSTEM + [21, 22], n=6)],
                        9: [job("c", SYSTEM + [31], n=7)], 20: [job("d", first + [41, 42, 43, 44, 45], n=5)]}
    eng_off, _, off = run_engine(loaded, arrivals(), settings=NO_PREFIX)
    eng_on, _, on = run_engine(loaded, arrivals(), settings=PAGED)
    assert _tokens(on, "abcd") == _tokens(off, "abcd"), kind
    assert all(len(t) for t in _tokens(on, "abcd").values())
    pool = eng_on.blocks
    # b, c and d each found SYSTEM's 5 full blocks; d also the block a's last prompt tokens filled.
    assert pool.hit_tokens == 20 + 20 + 24
    assert pool.miss_tokens == sum(len(p) for p in (first, SYSTEM + [21, 22], SYSTEM + [31], first + [41] * 5)) - 64
    assert eng_off.blocks.hit_tokens == 0
    assert pool.free_blocks == pool.num_blocks


def test_the_next_turn_of_a_conversation_reuses_the_previous_answers_blocks(family):
    """Turn 2's prompt is turn 1's prompt, its answer and a new message: every full block of turn 1's
    written tokens (its last chosen token was never fed) comes from the cache, with unchanged tokens."""
    kind, _, loaded = family
    first = SYSTEM + [11, 12, 13]  # 26 tokens
    _, _, turn1 = run_engine(loaded, {0: [job("a", first, n=11)]}, settings=SLOT)
    answer = generated_ids(turn1, "a")
    assert len(answer) == 11, kind
    second = first + answer + [51, 52]
    arrivals = lambda: {0: [job("a", first, n=11)], 15: [job("b", second, n=6)]}
    _, _, off = run_engine(loaded, arrivals(), settings=NO_PREFIX)
    eng, _, on = run_engine(loaded, arrivals(), settings=PAGED)
    assert _tokens(on, "ab") == _tokens(off, "ab") and _tokens(on, "a")["a"] == answer, kind
    written = len(first) + len(answer) - 1  # 36: nine full blocks of 4
    assert eng.blocks.hit_tokens == written // 4 * 4
    assert eng.blocks.miss_tokens == len(first) + len(second) - written // 4 * 4
    assert eng.blocks.free_blocks == eng.blocks.num_blocks


def test_a_request_for_prompt_logprobs_computes_its_whole_prompt(family):
    kind, _, loaded = family
    arrivals = lambda: {0: [job("a", SYSTEM + [1, 2], n=3)], 6: [job("b", SYSTEM + [3, 4], n=3, want_prefill=True)]}
    _, _, slot = run_engine(loaded, arrivals(), settings=SLOT)
    eng, _, paged = run_engine(loaded, arrivals(), settings=PAGED)
    want, got = slot.result("b").prefill, paged.result("b").prefill
    assert [t.id for t in got] == SYSTEM + [3, 4] and len(got) == len(want)
    assert got[0].logprob is None
    assert torch.allclose(torch.tensor([t.logprob for t in got[1:]]), torch.tensor([t.logprob for t in want[1:]]),
                          atol=1e-4), kind
    assert eng.blocks.hit_tokens == 0  # "a" registered the prefix, "b" did not use it


def test_the_paged_in_place_decode_step_gives_the_paged_forwards_tokens(family):
    """The step CUDA graphs record through the block tables (run eagerly here), with padded row buckets."""
    from worker.paged.graphs import PagedDecodeGraphs

    kind, _, loaded = family
    graphs = PagedDecodeGraphs(loaded.fast, loaded.model.get_output_embeddings(), loaded.fast.final_softcap,
                               capture=False)
    in_place = dataclasses.replace(loaded, paged_graphs=graphs)
    made = []
    new_step = graphs._new_step
    graphs._new_step = lambda rows, width, device: made.append((rows, width)) or new_step(rows, width, device)
    _, _, want = run_engine(loaded, _arrivals(), settings=PAGED)
    eng, _, got = run_engine(in_place, _arrivals(), settings=PAGED)
    assert _tokens(got) == _tokens(want), kind
    for rid in ("r1", "long"):
        a = torch.tensor([e.token.logprob for e in want.events_for(rid)])
        b = torch.tensor([e.token.logprob for e in got.events_for(rid)])
        assert torch.allclose(a, b, atol=1e-4), (kind, rid)
    assert {4, 8} <= {rows for rows, _ in made} and len({width for _, width in made}) >= 2  # padding ran
    kv = eng.kv
    for layer in range(len(loaded.fast.layers)):
        assert torch.isfinite(kv.keys[layer]).all() and torch.isfinite(kv.values[layer]).all()


def test_bf16_paged_decode_stays_close_to_the_slot_cache(family, tmp_path):
    """bf16 (on an AVX-512 CPU the compiled attention reads the blocks through the tables): loose."""
    from common.model_files import resolve
    from worker.model import load_model

    kind, path, _ = family
    loaded = load_model(resolve(str(path)), "", "cpu", "bf16", 1, rows_hint=8)
    _, _, slot = run_engine(loaded, _arrivals(), settings=SLOT)
    _, _, paged = run_engine(loaded, _arrivals(), settings=PAGED)
    same = [a == b for rid in ("r0", "r1", "long", "r2", "r3", "r4")
            for a, b in zip(generated_ids(slot, rid), generated_ids(paged, rid))]
    assert sum(same) >= 0.8 * len(same), kind
    a = torch.tensor([e.token.logprob for e in slot.events_for("r1")][:3])
    b = torch.tensor([e.token.logprob for e in paged.events_for("r1")][:3])
    assert torch.allclose(a, b, atol=0.1, rtol=0.05), kind


def test_a_dropped_engine_frees_its_block_pool_without_the_cyclic_collector(tiny_loaded):
    """An engine that refers to itself (a stored closure over self) keeps gigabytes of KV pool alive
    until the cyclic collector happens to run: a bench or a test that makes engines one after another
    runs out of memory."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        eng, source, sink = run_engine(tiny_loaded, _arrivals(), settings=PAGED)
        assert _tokens(sink)["long"]
        pool = weakref.ref(eng.kv.keys[0])
        del eng, source, sink
        assert pool() is None
    finally:
        gc.enable()
