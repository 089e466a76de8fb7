from __future__ import annotations

import pytest
import torch

from common.schemas import SamplingParams
from worker import sampling
from worker.sampling import SamplingBatch, choose, fold_seed, make_generator, process
from worker.warpers import repetition_penalty, top_k_filter, top_p_filter, typical_filter
from worker.watermark import Watermark

NEG = float("-inf")


# ---- straightforward per-row references (HF transformers' warpers, as TGI 0.5 used them) ----------

def ref_repetition(row: torch.Tensor, context: list[int], penalty: float) -> torch.Tensor:
    ids = torch.tensor(context)
    score = row.gather(0, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return row.scatter(0, ids, score)


def ref_top_k(row: torch.Tensor, k: int) -> torch.Tensor:
    if k == 0:
        return row
    kth = torch.topk(row, min(k, row.numel())).values[-1]
    return row.masked_fill(row < kth, NEG)


def ref_top_p(row: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return row
    sorted_logits, sorted_idx = torch.sort(row, descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove = cumulative <= (1 - p)
    remove[-1:] = False
    return row.masked_fill(remove.scatter(0, sorted_idx, remove), NEG)


def ref_typical(row: torch.Tensor, mass: float) -> torch.Tensor:
    if mass >= 1.0:
        return row
    logp = torch.log_softmax(row, -1)
    p = logp.exp()
    ent = -(logp * p).nansum()
    shifted = (-logp - ent).abs()
    sorted_scores, sorted_idx = torch.sort(shifted)
    cumulative = row[sorted_idx].softmax(-1).cumsum(-1)
    last = min(int((cumulative < mass).sum()), row.numel() - 1)
    remove = sorted_scores > sorted_scores[last]
    remove[:1] = False
    return row.masked_fill(remove.scatter(0, sorted_idx, remove), NEG)


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    finite = ~torch.isinf(a)
    assert torch.allclose(a[finite], b[finite], atol=1e-6)


def scores_for(seed: int, rows: int = 6, vocab: int = 500, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


def test_repetition_penalty_matches_hf():
    scores = scores_for(0, rows=3)
    contexts = [[1, 2, 2, 499], [0], [7, 8, 9, 10]]
    penalties = [1.3, 1.0, 0.7]
    seen = torch.zeros_like(scores, dtype=torch.bool)
    for i, c in enumerate(contexts):
        seen[i, c] = True
    out = repetition_penalty(scores, seen, torch.tensor(penalties)[:, None])
    for i in range(3):
        same(out[i], ref_repetition(scores[i], contexts[i], penalties[i]))


def test_top_k_matches_hf_per_row():
    scores = scores_for(1)
    ks = [0, 1, 5, 50, 499, 10_000]
    out = top_k_filter(scores.clone(), ks)
    for i, k in enumerate(ks):
        same(out[i], ref_top_k(scores[i], k))


@pytest.mark.parametrize("candidates", [4, 64, 10_000])
@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_top_p_matches_hf_with_and_without_fallback(candidates, scale):
    scores = scores_for(2, scale=scale)
    ps = [0.1, 0.5, 0.9, 0.95, 0.999, 1.0]
    out = top_p_filter(scores.clone(), ps, candidates)
    for i, p in enumerate(ps):
        same(out[i], ref_top_p(scores[i], p))


@pytest.mark.parametrize("candidates", [4, 64, 10_000])
@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_typical_matches_hf_with_and_without_fallback(candidates, scale):
    scores = scores_for(3, scale=scale)
    masses = [0.1, 0.5, 0.9, 0.95, 0.2, 1.0]
    out = typical_filter(scores.clone(), masses, candidates)
    for i, m in enumerate(masses):
        same(out[i], ref_typical(scores[i], m))


def test_full_pipeline_order_matches_reference():
    vocab = 400
    scores = scores_for(4, rows=4, vocab=vocab)
    params = [SamplingParams(),
              SamplingParams(watermark=True, repetition_penalty=1.2),
              SamplingParams(do_sample=True, temperature=0.7, top_k=40, top_p=0.9, typical_p=0.95,
                             repetition_penalty=1.5, watermark=True, seed=3),
              SamplingParams(temperature=2.0, top_p=0.5, seed=4)]
    contexts = [[1, 2], [3, 4, 5], [6, 6, 7], [8]]
    sb = SamplingBatch.build(params, [make_generator(p.seed) if p.sampling else None for p in params], "cpu")
    seen = torch.zeros(4, vocab, dtype=torch.bool)
    for i, c in enumerate(contexts):
        seen[i, c] = True
    wm = Watermark(vocab)
    out = process(scores.clone(), sb, seen, [c[-1] for c in contexts], wm, candidates=16)
    for i, (p, c) in enumerate(zip(params, contexts)):
        row = scores[i].clone()
        if p.watermark:
            row[wm.greenlist_ids(c[-1])] += 2.0
        if p.repetition_penalty != 1.0:
            row = ref_repetition(row, c, p.repetition_penalty)
        if p.temperature != 1.0:
            row = row / p.temperature
        row = ref_top_p(ref_top_k(row, p.top_k), p.top_p)
        row = ref_typical(row, p.typical_p)
        same(out[i], row)


def test_choose_greedy_and_logprob_of_processed_scores():
    scores = scores_for(5, rows=2)
    params = [SamplingParams(), SamplingParams(repetition_penalty=2.0)]
    sb = SamplingBatch.build(params, [None, None], "cpu")
    seen = torch.zeros_like(scores, dtype=torch.bool)
    top = int(scores[1].argmax())
    seen[1, top] = True
    ids, logprobs = choose(scores.clone(), sb, seen, [0, 0], None)
    assert int(ids[0]) == int(scores[0].argmax())
    assert abs(float(logprobs[0]) - float(torch.log_softmax(scores[0], -1)[ids[0]])) < 1e-5
    processed = ref_repetition(scores[1], [top], 2.0)
    assert int(ids[1]) == int(processed.argmax())
    assert abs(float(logprobs[1]) - float(torch.log_softmax(processed, -1)[ids[1]])) < 1e-5


def test_sampling_is_seeded_per_row_and_follows_the_distribution():
    vocab = 5
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0]) + 1e-30)
    params = [SamplingParams(do_sample=True, seed=7), SamplingParams(do_sample=True, seed=7),
              SamplingParams(do_sample=True, seed=8)]
    gens = [make_generator(p.seed) for p in params]
    sb = SamplingBatch.build(params, gens, "cpu")
    draws = []
    for _ in range(4000):
        ids, _ = choose(logits.repeat(3, 1), sb, None, [0, 0, 0], None)
        draws.append(ids.tolist())
    rows = list(zip(*draws))
    assert rows[0] == rows[1]  # same seed, same stream, whatever the neighbours
    assert rows[0] != rows[2]
    counts = torch.bincount(torch.tensor(rows[2]), minlength=vocab).float() / len(draws)
    assert counts[4] == 0
    assert torch.allclose(counts[:4], torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.03)


def test_seed_folding_keeps_high_bits_relevant():
    assert fold_seed(2**64 - 1) != fold_seed(2**32 - 1)
    assert fold_seed(2**63) != fold_seed(0)
    a = torch.rand(3, generator=make_generator(2**63 + 5))
    b = torch.rand(3, generator=make_generator(2**63 + 5))
    c = torch.rand(3, generator=make_generator(5))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_candidates_default_is_small():
    assert sampling.CANDIDATES <= 1024


CANDIDATE_CASES = [
    SamplingParams(do_sample=True, top_k=5),
    SamplingParams(top_k=40, temperature=0.7),
    SamplingParams(top_p=0.9),
    SamplingParams(top_p=0.3, temperature=1.5),
    SamplingParams(top_k=50, top_p=0.95, typical_p=0.9),
    SamplingParams(top_p=0.8, typical_p=0.5, temperature=0.8),
    SamplingParams(top_k=300, top_p=0.999),
    SamplingParams(top_p=0.99999),
]


@pytest.mark.parametrize("scale", [1.0, 4.0, 10.0])
@pytest.mark.parametrize("candidates", [8, 64])
def test_candidate_path_matches_dense_path(scale, candidates):
    from worker.sampling import warp_candidates, warp_dense

    params = CANDIDATE_CASES
    scores = scores_for(9, rows=len(params), vocab=500, scale=scale)
    temps = torch.tensor([[p.temperature] for p in params])
    cand = warp_candidates(scores.clone(), params, temps, candidates)
    dense = warp_dense(scores.clone(), params, temps, candidates)
    for i, p in enumerate(params):
        if cand.spill[i]:
            assert p.top_k == 0  # only a top-p nucleus wider than the candidates spills
            continue
        same(cand.dense(500)[i], dense[i])


def test_spill_goes_dense_and_every_draw_is_in_the_support():
    vocab = 2000
    flat = torch.zeros(2, vocab)  # a uniform distribution: a 0.5 nucleus needs 1000 ids
    params = [SamplingParams(top_p=0.5, seed=1), SamplingParams(top_k=3, seed=2)]
    flat[1, :3] = 5.0
    sb = SamplingBatch.build(params, [make_generator(p.seed) for p in params], "cpu")
    for _ in range(50):
        ids, lps = choose(flat.clone(), sb, None, [0, 0], None, candidates=16)
        assert int(ids[1]) < 3
        assert abs(float(lps[1]) - float(torch.log(torch.tensor(1 / 3)))) < 1e-5
        assert abs(float(lps[0]) - float(torch.log(torch.tensor(1 / 1000)))) < 1e-3


def test_candidate_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.05, 0.15, 0.3, 0.5] + [1e-9] * 96))
    params = [SamplingParams(top_k=3, seed=11), SamplingParams(top_p=0.4, seed=11)]
    sb = SamplingBatch.build(params, [make_generator(p.seed) for p in params], "cpu")
    draws = [choose(logits.repeat(2, 1), sb, None, [0, 0], None)[0].tolist() for _ in range(3000)]
    k_counts = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=4)[:4].float() / 3000
    assert torch.allclose(k_counts, torch.tensor([0.0, 0.15, 0.3, 0.5]) / 0.95, atol=0.03)
    assert {d[1] for d in draws} == {3}  # the nucleus of 0.4 is the single top id


def test_first_argmax_is_torch_argmax_ties_and_nan_included():
    from worker.sampling import first_argmax

    g = torch.Generator().manual_seed(3)
    scores = torch.randn(6, 49152, generator=g)
    scores[1, 5000] = scores[1, 70000 % 49152] = 100.0  # a tie across blocks: the first one wins
    scores[2, 300:302] = 50.0  # a tie inside one block
    scores[3] = float("-inf")  # nothing allowed: index 0, as torch.argmax
    scores[4, 20000] = float("nan")  # NaN counts as the maximum
    scores[5] = scores[5].round()  # many ties
    assert torch.equal(first_argmax(scores), torch.argmax(scores, dim=-1))
    odd = torch.randn(3, 1000, generator=g)  # not a multiple of the block: torch.argmax itself
    assert torch.equal(first_argmax(odd), torch.argmax(odd, dim=-1))
