"""Each decoder family's fused forward (worker/models/) against transformers, on tiny random checkpoints.

For every family: the fused logits match transformers' own forward row by row through a padded
prefill and decode steps (fp32, tight) and on the load probe in bf16 (loose); the engine's greedy
fp32 tokens equal transformers' `generate`; batching does not change them.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.model_files import resolve
from tests.support.tiny_families import WINDOW, build_family_model, family_configs
from worker import models
from worker.batch import prefill_inputs
from worker.kvcache import SlotCache
from worker.model import load_model

from .test_engine import generated_ids, job, run_engine

FAMILIES = sorted(family_configs())
# Lengths 3 to 21: the longer ones outgrow the 8-token windows during the prefill, all of them during decoding.
PROMPTS = [[5, 900, 33], [17, 2000, 3000, 44, 45, 46, 47, 48, 49], list(range(1000, 1021)), [100, 200, 300, 400, 500]]


def _reference(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def test_every_family_in_the_tests_has_a_fused_forward():
    assert set(FAMILIES) == set(models.FAMILIES)


def test_the_family_gets_its_fused_forward(family):
    kind, _, loaded = family
    assert type(loaded.fast) is models.FAMILIES[kind]
    assert len(loaded.fast.layers) == loaded.model.config.num_hidden_layers


def test_padded_prefill_then_decode_steps_match_transformers_row_by_row(family):
    kind, path, loaded = family
    reference = _reference(path)
    fast, head = loaded.fast, loaded.model.get_output_embeddings()

    def ours(hidden):
        return models.head_logits(head, hidden, fast.final_softcap).float()

    def theirs(ids):
        with torch.inference_mode():
            return reference(input_ids=torch.tensor([ids])).logits[0, -1].float()

    prompts = [list(p) for p in PROMPTS]
    inputs = prefill_inputs(prompts, torch.device("cpu"))
    cache = SlotCache(len(fast.layers))
    with torch.inference_mode():
        logits = ours(fast(inputs.input_ids, inputs.attention, inputs.position_ids, cache)[:, -1])
    mask, positions = inputs.mask, inputs.mask.sum(dim=1)
    for step in range(6):
        for i, p in enumerate(prompts):
            want = theirs(p)
            assert torch.allclose(logits[i], want, atol=1e-4 * want.abs().max().item()), (kind, step, i)
        nxt = logits.argmax(-1)
        for i, p in enumerate(prompts):
            p.append(int(nxt[i]))
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.bool)], dim=1)
        with torch.inference_mode():
            logits = ours(fast(nxt[:, None], mask[:, None, None, :], positions[:, None], cache)[:, -1])
        positions = positions + 1


def test_bf16_fused_forward_stays_within_bf16_rounding(family):
    kind, path, _ = family
    loaded = load_model(resolve(str(path)), "", "cpu", "bf16", 1, rows_hint=4)
    assert type(loaded.fast) is models.FAMILIES[kind]
    assert models.probe_deviation(_reference(path, torch.bfloat16), loaded.fast) < 5e-2


def test_engine_greedy_tokens_equal_transformers_generate_alone_and_batched(family):
    kind, path, loaded = family
    reference = _reference(path)
    lengths = [7, 10, 6, 12]
    want = {}
    for i, (prompt, n) in enumerate(zip(PROMPTS, lengths)):
        with torch.inference_mode():
            out = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     max_new_tokens=n, do_sample=False, eos_token_id=loaded.eos_token_id,
                                     pad_token_id=0)
        want[f"r{i}"] = out[0, len(prompt):].tolist()
        _, _, sink = run_engine(loaded, {0: [job(f"r{i}", prompt, n=n)]})
        assert generated_ids(sink, f"r{i}") == want[f"r{i}"], (kind, i)
    arrivals = {0: [job("r0", PROMPTS[0], n=lengths[0]), job("r1", PROMPTS[1], n=lengths[1])],
                2: [job("r2", PROMPTS[2], n=lengths[2])], 4: [job("r3", PROMPTS[3], n=lengths[3])]}
    _, _, sink = run_engine(loaded, arrivals)
    for rid, tokens in want.items():
        assert generated_ids(sink, rid) == tokens, (kind, rid)


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "gemma2"])
def test_the_sliding_windows_matter_in_these_checkpoints(kind, tmp_path):
    """Without its windows the fused forward no longer matches: the tests above do exercise them."""
    path = build_family_model(kind, tmp_path / kind)
    model = _reference(path)
    fast = models.FAMILIES[kind](model, 4, pack=False)
    assert fast.windows == [WINDOW]
    assert models.probe_deviation(model, fast) < 1e-4
    fast.windows = []
    for layer in fast.layers:
        layer.window = None
    assert models.probe_deviation(model, fast) > 1e-3


def test_gemma2s_soft_caps_matter_in_its_checkpoint(tmp_path):
    path = build_family_model("gemma2", tmp_path / "gemma2")
    model = _reference(path)
    for cap in ("attn_softcap", "final_softcap"):
        fast = models.FAMILIES["gemma2"](model, 4, pack=False)
        assert models.probe_deviation(model, fast) < 1e-4
        setattr(fast, cap, None)
        assert models.probe_deviation(model, fast) > 1e-3, cap


def test_other_architectures_say_why_they_keep_transformers_forward():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()
    reason = models.unsupported_reason(model)
    assert "'gpt2'" in reason and "qwen3" in reason
    assert models.build_fast(model, 4, pack=False) is None


def test_transformers_forward_gives_the_same_greedy_tokens_as_generate(family):
    """The fallback (--fused-forward false) too: tgq's mask reaches transformers' decoder with each
    layer's sliding window and in the form its attention adds (Gemma 2's eager attention)."""
    kind, path, _ = family
    plain = load_model(resolve(str(path)), "", "cpu", "fp32", 1, fused=False)
    assert plain.fast is None
    reference = _reference(path)
    prompt, n = PROMPTS[2], 9
    with torch.inference_mode():
        want = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=n, do_sample=False, eos_token_id=plain.eos_token_id, pad_token_id=0)
    arrivals = {0: [job("long", prompt, n=n), job("short", PROMPTS[0], n=4)]}
    _, _, sink = run_engine(plain, arrivals)
    assert generated_ids(sink, "long") == want[0, len(prompt):].tolist(), kind


def test_in_place_decode_gives_the_ordinary_forwards_tokens_and_logprobs(family):
    """The step CUDA graphs record (run eagerly here), with its sliding-window masks and soft-caps."""
    import dataclasses

    from worker.graphs import DecodeGraphs

    from .test_graphs import _arrivals

    kind, _, loaded = family
    graphs = DecodeGraphs(loaded.fast, loaded.model.get_output_embeddings(), loaded.fast.final_softcap, capture=False)
    in_place = dataclasses.replace(loaded, graphs=graphs)
    _, _, want = run_engine(loaded, _arrivals())
    _, _, got = run_engine(in_place, _arrivals())
    for rid, n in (("r0", 6), ("r1", 9), ("long", 45), ("r2", 12), ("r3", 3), ("r4", 20)):
        assert generated_ids(got, rid) == generated_ids(want, rid), (kind, rid)
        assert len(generated_ids(got, rid)) == n
        a = torch.tensor([e.token.logprob for e in want.events_for(rid)])
        b = torch.tensor([e.token.logprob for e in got.events_for(rid)])
        assert torch.allclose(a, b, atol=1e-4), (kind, rid)
