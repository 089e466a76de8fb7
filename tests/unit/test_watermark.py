from __future__ import annotations

import torch

from worker.watermark import DELTA, GAMMA, HASH_KEY, Watermark


def reference_greenlist(vocab: int, prev: int) -> torch.Tensor:
    """TGI utils/watermark.py: randperm(V) seeded with hash_key * prev; first int(V * gamma) ids."""
    rng = torch.Generator(device="cpu")
    rng.manual_seed(HASH_KEY * prev)
    return torch.randperm(vocab, generator=rng)[: int(vocab * GAMMA)]


def test_greenlist_matches_tgi():
    wm = Watermark(1000)
    for prev in (0, 1, 17, 999):
        assert torch.equal(wm.greenlist_ids(prev), reference_greenlist(1000, prev))
    assert wm.greenlist_ids(3).numel() == 500


def test_apply_adds_delta_on_listed_rows_only():
    vocab = 300
    wm = Watermark(vocab)
    scores = torch.randn(3, vocab)
    before = scores.clone()
    out = wm.apply(scores, [0, 2], [5, 7])
    for row, prev in ((0, 5), (2, 7)):
        expected = before[row].clone()
        expected[reference_greenlist(vocab, prev)] += DELTA
        assert torch.allclose(out[row], expected)
    assert torch.equal(out[1], before[1])
    # Cached greenlists give the same answer the second time.
    again = wm.apply(before.clone(), [0], [5])
    assert torch.allclose(again[0], out[0])
