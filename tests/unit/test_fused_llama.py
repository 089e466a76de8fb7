"""tgq's fused Llama forward (worker/models/llama.py on worker/models/base.py) computes what transformers' forward computes."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from common.model_files import resolve
from worker import models
from worker.models.llama import Llama
from worker.batch import prefill_inputs
from worker.kvcache import SlotCache
from worker.model import load_model

from .test_engine import PROMPTS, generated_ids, job, run_engine


def _reference_logits(model, ids: list[int]) -> torch.Tensor:
    """transformers' own forward on one unpadded sequence: logits of its last position."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def test_llama_models_get_the_fused_forward(tiny_loaded):
    assert tiny_loaded.fast is not None
    assert len(tiny_loaded.fast.layers) == tiny_loaded.model.config.num_hidden_layers


def test_padded_prefill_then_decode_steps_match_transformers_row_by_row(tiny_loaded, tiny_model_dir):
    """Left-padded rows of different lengths, then decode steps over the cache's padded buffer."""
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    fast, head = tiny_loaded.fast, tiny_loaded.model.get_output_embeddings()
    prompts = [list(p) for p in PROMPTS]
    inputs = prefill_inputs(prompts, torch.device("cpu"))
    cache = SlotCache(len(fast.layers))
    with torch.inference_mode():
        logits = head(fast(inputs.input_ids, inputs.attention, inputs.position_ids, cache)[:, -1]).float()
    mask, positions = inputs.mask, inputs.mask.sum(dim=1)
    for step in range(6):
        for i, p in enumerate(prompts):
            assert torch.allclose(logits[i], _reference_logits(reference, p), atol=1e-4), (step, i)
        nxt = logits.argmax(-1)
        for i, p in enumerate(prompts):
            p.append(int(nxt[i]))
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.bool)], dim=1)
        with torch.inference_mode():
            hidden = fast(nxt[:, None], mask[:, None, None, :], positions[:, None], cache)
            logits = head(hidden[:, -1]).float()
        positions = positions + 1
    # The decode steps attended over the buffer's spare columns too (masked): there were some.
    layer = cache.slot_layers[0]
    assert layer.kbuf.shape[2] > layer.end - layer.start


def test_engine_tokens_are_the_same_with_transformers_forward(tiny_model_dir, tiny_loaded):
    plain = load_model(resolve(str(tiny_model_dir)), "", "cpu", "fp32", 1, fused=False)
    assert plain.fast is None
    arrivals = lambda: {0: [job("a", PROMPTS[0], n=6), job("b", PROMPTS[1], n=9)], 3: [job("c", PROMPTS[3], n=5)]}
    _, _, fused_sink = run_engine(tiny_loaded, arrivals())
    _, _, plain_sink = run_engine(plain, arrivals())
    for rid in "abc":
        assert generated_ids(fused_sink, rid) == generated_ids(plain_sink, rid)
        assert generated_ids(fused_sink, rid)


def test_bf16_fused_forward_stays_within_bf16_rounding(tiny_model_dir):
    loaded = load_model(resolve(str(tiny_model_dir)), "", "cpu", "bf16", 1, rows_hint=4)
    assert loaded.fast is not None
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16).eval()
    assert models.probe_deviation(reference, loaded.fast) < 5e-2


def test_a_fused_forward_that_computes_something_else_is_refused(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    fast = Llama(model, 4, pack=False)
    assert models.probe_deviation(model, fast) < 1e-4
    fast.layers[0].norm2 = torch.zeros_like(fast.layers[0].norm2)  # the first MLP no longer contributes
    assert models.probe_deviation(model, fast) > 1e-2


def test_other_architectures_keep_transformers_forward():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()
    assert "gpt2" in models.unsupported_reason(model)
    assert models.build_fast(model, 4, pack=False) is None


def test_rotary_tables_hold_what_transformers_computes_per_call(tiny_loaded):
    fast = tiny_loaded.fast
    assert fast._cos is not None
    x = torch.zeros(1, 1)
    inside = torch.tensor([[0, 1, 2, 77], [4000, 17, 5, 3]])
    beyond = torch.tensor([[fast._cos.shape[0] + 5]])  # past the table: transformers' module itself
    for positions in (inside, beyond):
        got, want = fast._rotary(x, positions), fast.rotary(x, positions)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_decode_attention_with_a_scale_that_is_not_a_power_of_two():
    """head_dim 12: the scores are scaled after the matmul (no baddbmm); logits still match transformers'."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    fast = Llama(model, 4, pack=False)
    assert not fast.fold_scale
    assert models.probe_deviation(model, fast) < 1e-4


def test_power_of_two_scales_fold_into_the_scores_matmul(tiny_loaded):
    assert tiny_loaded.fast.fold_scale  # head_dim 16: scale 1/4
