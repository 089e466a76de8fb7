from __future__ import annotations

import pytest
import torch

from common.schemas import SamplingParams
from worker import sampling
from worker import processors
from worker.sampling import SamplingBatch, fold_seed, make_generator, warp_dense
from worker.sampling import choose as draw
from worker.warpers import CANDIDATES
from worker.warpers import repetition_penalty, top_k_filter, top_p_filter, typical_filter
from worker.watermark import Watermark

NEG = float("-inf")


# ---- straightforward per-row references (HF transformers' warpers, as TGI 0.5 used them) ----------

def ref_repetition(row: torch.Tensor, context: list[int], penalty: float) -> torch.Tensor:
    ids = torch.tensor(context)
    score = row.gather(0, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return row.scatter(0, ids, score)


def process(scores, sb, seen, counts, prev_ids, watermark, candidates=CANDIDATES):
    """The processors, then the warpers: the distribution a row draws from."""
    steps = processors.for_batch(sb, seen, counts, prev_ids, watermark)
    return warp_dense(processors.apply(steps, scores), sb.params, sb.temperature, candidates)


def choose(scores, sb, seen, counts, prev_ids, watermark, candidates=CANDIDATES):
    """The processors, then the warpers and the draw (what worker.chooser does off the greedy kernel)."""
    return draw(processors.apply(processors.for_batch(sb, seen, counts, prev_ids, watermark), scores), sb, candidates)



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
    out = process(scores.clone(), sb, seen, None, [c[-1] for c in contexts], wm, candidates=16)
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
    choice = choose(scores.clone(), sb, seen, None, [0, 0], None)
    ids, logprobs = choice.ids, choice.logprobs
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
        ids = choose(logits.repeat(3, 1), sb, None, None, [0, 0, 0], None).ids
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
        choice = choose(flat.clone(), sb, None, None, [0, 0], None, candidates=16)
        ids, lps = choice.ids, choice.logprobs
        assert int(ids[1]) < 3
        assert abs(float(lps[1]) - float(torch.log(torch.tensor(1 / 3)))) < 1e-5
        assert abs(float(lps[0]) - float(torch.log(torch.tensor(1 / 1000)))) < 1e-3


def test_candidate_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.05, 0.15, 0.3, 0.5] + [1e-9] * 96))
    params = [SamplingParams(top_k=3, seed=11), SamplingParams(top_p=0.4, seed=11)]
    sb = SamplingBatch.build(params, [make_generator(p.seed) for p in params], "cpu")
    draws = [choose(logits.repeat(2, 1), sb, None, None, [0, 0], None).ids.tolist() for _ in range(3000)]
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


# ---- OpenAI's frequency and presence penalties ----------------------------------------------------

def ref_openai(row: torch.Tensor, generated: list[int], frequency: float, presence: float) -> torch.Tensor:
    """vLLM's rule, one id at a time: only generated ids count, the prompt does not."""
    out = row.clone()
    for t in set(generated):
        out[t] -= frequency * generated.count(t) + presence
    return out


def counts_of(generated: list[list[int]], vocab: int) -> torch.Tensor:
    counts = torch.zeros(len(generated), vocab)
    for i, ids in enumerate(generated):
        for t in ids:
            counts[i, t] += 1
    return counts


def test_openai_penalties_follow_the_repetition_penalty_and_precede_temperature():
    vocab = 300
    scores = scores_for(12, rows=5, vocab=vocab)
    params = [SamplingParams(frequency_penalty=0.5),
              SamplingParams(presence_penalty=1.5, repetition_penalty=1.3, temperature=0.5, seed=1),
              SamplingParams(),  # untouched next to penalised rows
              SamplingParams(frequency_penalty=-0.7, presence_penalty=-2.0),  # negative: repeats rewarded
              SamplingParams(frequency_penalty=2.0, presence_penalty=0.25, repetition_penalty=0.8)]
    prompts = [[1, 2], [3, 4, 4], [5], [6, 7], [8, 9]]
    generated = [[10, 10, 10, 2], [3, 11, 11], [12, 12], [13, 6, 13, 14], [15, 8, 15]]
    seen = torch.zeros(5, vocab, dtype=torch.bool)
    for i, (p, g) in enumerate(zip(prompts, generated)):
        seen[i, p + g] = True
    sb = SamplingBatch.build(params, [make_generator(p.seed) if p.sampling else None for p in params], "cpu")
    assert sb.openai_rows == [0, 1, 3, 4] and processors.for_batch(sb, seen, counts_of(generated, vocab), [0] * 5, None)
    out = process(scores.clone(), sb, seen, counts_of(generated, vocab), [0] * 5, None)
    for i, p in enumerate(params):
        row = ref_repetition(scores[i], prompts[i] + generated[i], p.repetition_penalty)
        row = ref_openai(row, generated[i], p.frequency_penalty, p.presence_penalty)
        same(out[i], row / p.temperature)
    assert torch.equal(out[2], scores[2])


def test_rows_without_openai_penalties_keep_the_plain_greedy_path():
    counts = torch.zeros(2, 10)
    sb = SamplingBatch.build([SamplingParams()] * 2, [None, None], "cpu")
    assert sb.all_greedy and not processors.for_batch(sb, None, counts, [0, 0], None)
    for penalty in ({"frequency_penalty": 0.1}, {"presence_penalty": -0.1}):
        sb = SamplingBatch.build([SamplingParams(), SamplingParams(**penalty)], [None, None], "cpu")
        assert processors.for_batch(sb, None, counts, [0, 0], None) and sb.needs_counts and sb.openai_rows == [1]


# ---- top_n_tokens alternatives --------------------------------------------------------------------

TOP_CASES = [SamplingParams(top_n_tokens=5),  # greedy, dense
             SamplingParams(),  # asks for nothing
             SamplingParams(repetition_penalty=1.5, frequency_penalty=0.4, top_n_tokens=3),
             SamplingParams(do_sample=True, top_k=3, top_n_tokens=5, seed=1),  # two alternatives removed
             SamplingParams(top_p=0.9, temperature=0.7, top_n_tokens=20, seed=2),  # candidates
             SamplingParams(typical_p=0.5, top_n_tokens=4, seed=3),  # dense, removes likely ids too
             SamplingParams(top_k=2, top_n_tokens=1, seed=4)]


def choose_with_top(params: list[SamplingParams], scores: torch.Tensor, candidates: int = 16):
    """The choice and, for reference, the processed scores of the same rows."""
    vocab = scores.shape[1]
    seen = torch.zeros(len(params), vocab, dtype=torch.bool)
    seen[:, :5] = True
    counts = torch.zeros(len(params), vocab)
    counts[:, 3] = 2
    gens = [make_generator(p.seed) if p.sampling else None for p in params]
    sb = SamplingBatch.build(params, gens, "cpu")
    processed = process(scores.clone(), sb, seen, counts, [0] * len(params), None, candidates)
    sb = SamplingBatch.build(params, [make_generator(p.seed) if p.sampling else None for p in params], "cpu")
    return choose(scores.clone(), sb, seen, counts, [0] * len(params), None, candidates), processed


@pytest.mark.parametrize("candidates", [4, 16, 10_000])
def test_alternatives_are_the_best_ids_of_the_processed_distribution(candidates):
    scores = scores_for(13, rows=len(TOP_CASES), vocab=400)
    choice, processed = choose_with_top(TOP_CASES, scores, candidates)
    top = choice.top
    assert top is not None and top.rows == [0, 2, 3, 4, 5, 6] and top.counts == [5, 3, 5, 20, 4, 1]
    reference = torch.log_softmax(processed, dim=-1)
    for j, (row, n) in enumerate(zip(top.rows, top.counts)):
        ids, lps = top.ids[j, :n], top.logprobs[j, :n]
        assert len(set(ids.tolist())) == n
        assert torch.equal(lps, lps.sort(descending=True).values)
        finite = torch.isfinite(lps)
        assert torch.allclose(lps[finite], reference[row, ids][finite], atol=1e-5)
        assert torch.isinf(reference[row, ids][~finite]).all()
        # Every id left out is no more likely than the last one listed.
        left_out = torch.ones(400, dtype=torch.bool)
        left_out[ids] = False
        assert bool((reference[row][left_out] <= lps[-1] + 1e-6).all())
        # The chosen token is among the alternatives with the same logprob (first for greedy rows),
        # unless it was drawn from beyond a short list.
        chosen = int(choice.ids[row])
        if TOP_CASES[row].sampling and chosen not in ids.tolist():
            assert float(choice.logprobs[row]) <= float(lps[-1]) + 1e-6
            continue
        assert abs(float(lps[ids.tolist().index(chosen)]) - float(choice.logprobs[row])) < 1e-6
        if not TOP_CASES[row].sampling:
            assert int(ids[0]) == chosen and float(lps[0]) == float(choice.logprobs[row])
    assert [int(x) for x in torch.isinf(top.logprobs[2, :5])] == [0, 0, 0, 1, 1]  # top_k=3 of 5


def test_no_row_asking_means_no_alternatives():
    choice, _ = choose_with_top([SamplingParams(), SamplingParams(do_sample=True, top_k=4, seed=1)],
                                scores_for(14, rows=2, vocab=100))
    assert choice.top is None


def test_alternatives_of_ties_list_the_lowest_ids_first_as_argmax_chooses():
    from worker.alternatives import Alternatives

    logits = torch.zeros(2, 64)
    logits[0, [40, 9, 30]] = 3.0
    logits[1, 50] = 1.0
    top = Alternatives.of_logits(logits, [SamplingParams(top_n_tokens=4), SamplingParams(top_n_tokens=2)])
    assert top is not None
    assert top.ids[0, :3].tolist() == [9, 30, 40]  # a tie inside the list: by id
    assert int(top.ids[0, 3]) not in (9, 30, 40) and int(top.ids[1, 0]) == 50  # a tie at its end: any of them
    assert torch.allclose(top.logprobs, torch.log_softmax(logits, -1).gather(1, top.ids))


def test_alternatives_become_tokens_with_their_own_text():
    from worker.alternatives import Alternatives

    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    top = Alternatives.of_logits(logits, [SamplingParams(top_n_tokens=20)])  # more than the vocabulary
    tokens = top.tokens(lambda t: f"<{t}>", frozenset({2}))
    want = torch.log_softmax(logits[0], -1)
    assert [(t.id, t.text, t.special) for t in tokens[0]] == [(1, "<1>", False), (2, "<2>", True),
                                                              (0, "<0>", False), (3, "<3>", False)]
    assert [t.logprob for t in tokens[0]] == pytest.approx([float(want[i]) for i in (1, 2, 0, 3)])
    assert all(t.top == () for t in tokens[0])
