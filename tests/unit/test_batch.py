from __future__ import annotations

import pytest
import torch

from common.schemas import GenerationJob, SamplingParams, StoppingParams
from worker.batch import Batch, new_rows, prefill_inputs
from worker.detokenize import make_decoder
from worker.kvcache import SlotCache
from worker.model import forward
from worker.sampling import make_generator

PROMPTS = {"a": [5, 900, 33], "b": [17, 2000, 3000, 44, 45, 46, 47, 48, 49],
           "c": [100, 200, 300, 400, 500], "d": list(range(1000, 1012))}


def reference_greedy(loaded, prompt, n):
    """Independent reference: transformers' own generate, one prompt alone, no padding."""
    out = loaded.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prefill(loaded, keys):
    jobs = [GenerationJob(k, tuple(PROMPTS[k]), SamplingParams(), StoppingParams(50), "") for k in keys]
    rows = new_rows(jobs, None, make_decoder(loaded.tokenizer), make_generator, 0.0)
    inputs = prefill_inputs([PROMPTS[k] for k in keys], loaded.device)
    out = forward(loaded, inputs.input_ids, inputs.attention, inputs.position_ids,
                  SlotCache(loaded.model.config.num_hidden_layers), logits_to_keep=1)
    first = out.logits[:, -1].argmax(-1)
    batch = Batch(rows=rows, cache=out.cache, mask=inputs.mask, next_pos=inputs.mask.sum(1), last_ids=first,
                  vocab_size=loaded.vocab_size, device=loaded.device)
    return batch, {k: [int(t)] for k, t in zip(keys, first)}


def decode(loaded, batch, produced, steps):
    for _ in range(steps):
        ids, mask, pos = batch.decode_inputs()
        out = forward(loaded, ids, mask, pos, batch.cache)
        nxt = out.logits[:, -1].argmax(-1)
        batch.advance(nxt)
        for row, t in zip(batch.rows, nxt.tolist()):
            produced[row.job.request_id].append(t)


def test_prefill_inputs_left_pad_and_positions():
    inp = prefill_inputs([[1, 2, 3], [4]], torch.device("cpu"))
    assert inp.input_ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert inp.mask.tolist() == [[True, True, True], [False, False, True]]
    assert inp.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert inp.attention.shape == (2, 1, 3, 3)
    assert inp.attention[1, 0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]


def test_filter_and_merge_match_independent_greedy(tiny_loaded):
    loaded = tiny_loaded
    batch, produced = prefill(loaded, ["a", "b"])
    decode(loaded, batch, produced, 3)
    newcomers, more = prefill(loaded, ["c"])
    produced.update(more)
    batch.concatenate(newcomers)
    decode(loaded, batch, produced, 2)
    batch.filter([0, 2])  # b leaves; its long prompt's padding columns are compacted away
    assert batch.mask.shape[1] == batch.cache.length()
    assert bool(batch.mask.any(dim=0)[0])
    decode(loaded, batch, produced, 3)
    late, more = prefill(loaded, ["d"])
    produced.update(more)
    batch.concatenate(late)
    decode(loaded, batch, produced, 4)
    for key, tokens in produced.items():
        assert tokens == reference_greedy(loaded, PROMPTS[key], len(tokens)), key


def test_cache_grows_past_its_reserve(tiny_loaded):
    batch, produced = prefill(tiny_loaded, ["a"])
    decode(tiny_loaded, batch, produced, 40)  # more than the 32 spare columns
    assert produced["a"] == reference_greedy(tiny_loaded, PROMPTS["a"], 41)


def test_seen_mask_tracks_context_for_repetition_penalty(tiny_loaded):
    job = GenerationJob("p", (1, 2, 3), SamplingParams(repetition_penalty=1.5), StoppingParams(5), "")
    rows = new_rows([job], None, make_decoder(tiny_loaded.tokenizer), make_generator, 0.0)
    batch = Batch(rows=rows, cache=SlotCache(2), mask=torch.ones(1, 3, dtype=torch.bool),
                  next_pos=torch.tensor([3]), last_ids=torch.tensor([9]), vocab_size=tiny_loaded.vocab_size,
                  device=torch.device("cpu"))
    assert batch.seen is not None
    assert batch.seen[0].nonzero().squeeze(1).tolist() == [1, 2, 3]
    batch.note_seen(torch.tensor([7]))
    assert batch.seen[0, 7]


def test_counts_track_generated_ids_only_for_openai_penalties(tiny_loaded):
    jobs = [GenerationJob("f", (1, 2, 3), SamplingParams(frequency_penalty=0.5), StoppingParams(5), ""),
            GenerationJob("g", (4, 5, 6), SamplingParams(), StoppingParams(5), "")]
    rows = new_rows(jobs, None, make_decoder(tiny_loaded.tokenizer), make_generator, 0.0)
    rows[0].ids += [7, 7]  # generated before the batch was (re)built
    batch = Batch(rows=rows, cache=SlotCache(2), mask=torch.ones(2, 3, dtype=torch.bool),
                  next_pos=torch.tensor([3, 3]), last_ids=torch.tensor([7, 9]), vocab_size=tiny_loaded.vocab_size,
                  device=torch.device("cpu"))
    assert batch.seen is None and batch.counts is not None
    assert batch.counts[0].nonzero().squeeze(1).tolist() == [7] and float(batch.counts[0, 7]) == 2.0
    batch.note_seen(torch.tensor([7, 8]))
    assert float(batch.counts[0, 7]) == 3.0 and float(batch.counts[1, 8]) == 1.0


@pytest.mark.parametrize("reserve", [0, 4])
def test_slot_layer_compact_and_absorb(reserve):
    from worker.kvcache import SlotLayer

    def kv(rows, cols, base):
        return torch.arange(base, base + rows * cols * 2, dtype=torch.float32).view(rows, 1, cols, 2)

    layer = SlotLayer(reserve)
    k = kv(3, 3, 0)
    keys, _ = layer.update(k, k)
    assert torch.equal(keys, k)
    # Row 0 leaves: row 2 moves into its slot; the first column is dropped.
    layer.compact(holes=[0], movers=[2], rows=2, drop_front=1)
    assert torch.equal(layer.keys, k[[2, 1], :, 1:])
    # A newcomer with a longer window: ours get left padding (zeros), its keys right-aligned.
    other = SlotLayer(reserve)
    n = kv(1, 4, 100)
    other.update(n, n)
    layer.absorb(other)
    assert layer.keys.shape == (3, 1, 4, 2)
    assert torch.equal(layer.keys[2], n[0])
    assert torch.equal(layer.keys[:2, :, 2:], k[[2, 1], :, 1:])
    assert torch.equal(layer.keys[:2, :, :2], torch.zeros(2, 1, 2, 2))
    # Appending a decode column keeps everything else in place.
    col = kv(3, 1, 500)
    keys, _ = layer.update(col, col)
    assert torch.equal(keys[:, :, -1], col[:, :, 0])
    assert torch.equal(keys[2, :, :4], n[0])


def test_random_joins_and_leaves_match_independent_greedy(tiny_loaded):
    loaded = tiny_loaded
    gen = torch.Generator().manual_seed(7)
    prompts = {f"p{i}": torch.randint(20, 40000, (int(torch.randint(1, 20, (1,), generator=gen)),),
                                      generator=gen).tolist() for i in range(8)}
    PROMPTS.update(prompts)
    names = list(prompts)
    batch, produced = prefill(loaded, names[:2])
    pending = names[2:]
    for step in range(12):
        decode(loaded, batch, produced, 1)
        if step % 3 == 1 and pending:
            newcomers, more = prefill(loaded, pending[:2])
            pending = pending[2:]
            produced.update(more)
            batch.concatenate(newcomers)
        if step % 4 == 2 and len(batch) > 1:
            batch.filter([i for i in range(len(batch)) if i != step % len(batch)])
        assert batch.mask.shape[1] == batch.cache.length()
    for key, tokens in produced.items():
        assert tokens == reference_greedy(loaded, PROMPTS[key], len(tokens)), key
