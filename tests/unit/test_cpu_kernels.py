"""The compiled CPU kernels (worker/cpu_kernels.py) compute what torch's ops compute."""
from __future__ import annotations

import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import torch.nn.functional as F

from worker import cpu_kernels, models
from worker.models import layers
from worker.models.llama import Llama
from worker.batch import prefill_inputs
from worker.kvcache import SlotCache

pytestmark = pytest.mark.skipif(not cpu_kernels.cpu_supported() or cpu_kernels._compiler() is None,
                                reason="needs an AVX-512 CPU and a C++ compiler")

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return cpu_kernels.CpuKernels(cpu_kernels.build_library(tmp_path_factory.mktemp("kernels")))


@pytest.mark.parametrize("shape", [(3, 1, 64), (33, 576), (4, 7, 128)])
def test_rms_norm_rounds_like_torch(kernel, shape):
    g = torch.Generator().manual_seed(3)
    x = (4 * torch.randn(*shape, generator=g)).to(BF16)
    weight = (torch.rand(shape[-1], generator=g) + 0.5).to(BF16)
    want = F.rms_norm(x, (shape[-1],), eps=1e-5) * weight  # transformers' LlamaRMSNorm, bit for bit
    got = kernel.rms_norm(x, weight, 1e-5)
    assert got.shape == want.shape and got.dtype == BF16
    assert _within_one_bf16_place(got, want) and (got != want).float().mean() < 0.01


def test_rms_norm_reads_strided_rows(kernel):
    """The last position of each row of a [B, T, H] prefill output: rows T * H apart."""
    x = torch.randn(3, 5, 64).to(BF16)
    weight = torch.ones(64, dtype=BF16)
    assert torch.equal(kernel.rms_norm(x[:, -1:], weight, 1e-6), kernel.rms_norm(x[:, -1:].contiguous(), weight, 1e-6))


def test_residual_add_and_norm_in_one_pass(kernel):
    g = torch.Generator().manual_seed(4)
    x, delta = (3 * torch.randn(2, 5, 576, generator=g)).to(BF16), torch.randn(2, 5, 576, generator=g).to(BF16)
    weight = (torch.rand(576, generator=g) + 0.5).to(BF16)
    total, normed = kernel.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(total, x + delta)  # rounded once to bf16, as torch's add
    assert torch.equal(normed, kernel.rms_norm(x + delta, weight, 1e-5))
    with pytest.raises(ValueError):
        kernel.add_rms_norm(x, delta.transpose(0, 1).contiguous().transpose(0, 1), weight, 1e-5)


@pytest.mark.parametrize("t,n_q,n_kv,head_dim", [(1, 9, 3, 64), (7, 4, 2, 16), (2, 8, 8, 128)])
def test_rope_rounds_like_torch(kernel, t, n_q, n_kv, head_dim):
    """Each product and the sum rounded to bf16 where torch's ops round them: the same bits."""
    g = torch.Generator().manual_seed(5)
    qkv = (4 * torch.randn(3, t, n_q + 2 * n_kv, head_dim, generator=g)).to(BF16)
    qk = qkv[:, :, :n_q + n_kv]  # the projection's layout: positions (n_q + 2 n_kv) * D apart
    cos, sin = (torch.randn(3, t, 1, head_dim, generator=g).to(BF16) for _ in range(2))
    half = head_dim // 2
    want = qk * cos + torch.cat((qk[..., half:], qk[..., :half]), dim=-1) * sin
    got = kernel.rope(qk, cos, sin)
    assert got.is_contiguous() and torch.equal(got, want)


def _torch_attention(q, kbuf, vbuf, bias, n_q, n_kv, head_dim):
    """FastLlama's torch path, the reference."""
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=n_q * head_dim, intermediate_size=8,
                                         num_hidden_layers=1, num_attention_heads=n_q,
                                         num_key_value_heads=n_kv, head_dim=head_dim))
    fast = Llama(model.to(BF16), 1, pack=False)
    return fast._decode_attention(q, kbuf, vbuf, layers.grouped_bias(bias, fast.n_q, fast.n_kv))


def _inputs(rows, n_q, n_kv, head_dim, columns, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = (3 * torch.randn(rows, 1, n_q + 2 * n_kv, head_dim, generator=g)).to(BF16)
    q = qkv[:, :, :n_q].transpose(1, 2)  # the model's layout: a strided view of the projection
    kbuf = torch.randn(rows, n_kv, columns, head_dim, generator=g).to(BF16)
    vbuf = torch.randn(rows, n_kv, columns, head_dim, generator=g).to(BF16)
    bias = torch.zeros(rows, columns, dtype=BF16)
    bias[:, columns - 7:] = float("-inf")  # spare columns past the window
    bias[0, :5] = float("-inf")  # a shorter row's left padding
    return q, kbuf, vbuf, bias


def _within_one_bf16_place(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal, or apart by at most one unit in the last place of a bf16 (8 significant bits)."""
    got, want = got.float(), want.float()
    return bool(((got == want) | ((got - want).abs() <= want.abs() * 2 ** -7)).all())


@pytest.mark.parametrize("n_q,n_kv,head_dim", [(9, 3, 64), (8, 2, 128), (4, 4, 64)])
def test_each_pass_rounds_like_torch(kernel, n_q, n_kv, head_dim):
    """Scores against baddbmm, and probabilities times values against bmm: only the order of fp32
    additions differs, so an output is the same bf16 or the next one, and rarely the next one."""
    q, kbuf, vbuf, bias = _inputs(6, n_q, n_kv, head_dim, 41)
    groups, scale = n_q // n_kv, head_dim ** -0.5
    grouped_bias = bias[:, None, None, :].expand(6, n_kv, groups, 41).reshape(6 * n_kv, groups, 41)
    keys, values = kbuf.view(6 * n_kv, 41, head_dim), vbuf.view(6 * n_kv, 41, head_dim)
    want = torch.baddbmm(grouped_bias, q.reshape(6 * n_kv, groups, head_dim), keys.transpose(1, 2), alpha=scale)
    got = kernel.scores(q, kbuf, bias, scale)
    assert got.dtype == BF16 and _within_one_bf16_place(got, want)
    assert (got != want).float().mean() < 0.02
    probs = torch.softmax(want, dim=-1)
    want = torch.bmm(probs, values).view(6, 1, n_q * head_dim)
    got = kernel.mix(probs, vbuf, bias)
    assert got.shape == want.shape and _within_one_bf16_place(got, want)
    assert (got != want).float().mean() < 0.02


def test_kernel_matches_torch_attention(kernel):
    q, kbuf, vbuf, bias = _inputs(6, 9, 3, 64, 41)
    want = _torch_attention(q, kbuf, vbuf, bias, 9, 3, 64)
    got = kernel.attention(q, kbuf, vbuf, bias, 0.125)
    assert got.shape == want.shape == (6, 1, 9 * 64) and got.dtype == BF16
    # A score a place apart moves its probability by up to 2**-8 of the score: small differences only.
    assert ((got.float() - want.float()).abs().mean() / want.float().abs().mean()) < 1e-2


def test_masked_columns_are_never_read(kernel):
    """Whatever a masked column holds (a departed row's keys, huge values) does not change the output."""
    q, kbuf, vbuf, bias = _inputs(4, 9, 3, 64, 30, seed=1)
    before = kernel.attention(q, kbuf, vbuf, bias, 0.125)
    masked = torch.isinf(bias)[:, None, :, None].expand_as(kbuf)
    kbuf[masked], vbuf[masked] = 3e38, float("nan")
    assert torch.equal(kernel.attention(q, kbuf, vbuf, bias, 0.125), before)


def test_a_row_gets_the_same_output_in_any_batch(kernel):
    """Each (row, KV head) sums its own columns in column order: its companions do not matter."""
    q, kbuf, vbuf, bias = _inputs(5, 9, 3, 64, 33, seed=2)
    batch = kernel.attention(q, kbuf, vbuf, bias, 0.125)
    for i in range(5):
        alone = kernel.attention(q[i:i + 1], kbuf[i:i + 1].clone(), vbuf[i:i + 1].clone(), bias[i:i + 1].clone(), 0.125)
        assert torch.equal(alone[0], batch[i])


def test_unexpected_layouts_are_refused(kernel):
    q, kbuf, vbuf, bias = _inputs(2, 9, 3, 64, 16)
    with pytest.raises(ValueError):
        kernel.attention(q, kbuf.transpose(2, 3).contiguous().transpose(2, 3), vbuf, bias, 0.125)
    with pytest.raises(ValueError):
        kernel.attention(q.contiguous().transpose(1, 3).contiguous().transpose(1, 3), kbuf, vbuf, bias, 0.125)


def test_the_library_is_built_once_per_source(tmp_path):
    first = cpu_kernels.build_library(tmp_path)
    built_at = first.stat().st_mtime_ns
    assert cpu_kernels.build_library(tmp_path) == first and first.stat().st_mtime_ns == built_at
    built = [p.name for p in (tmp_path / "kernels").iterdir() if not p.name.endswith(".lock")]
    assert built == [first.parent.name] and [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary files left


def test_a_failing_compiler_leaves_torch_ops(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CXX", shutil.which("false") or "/bin/false")
    assert cpu_kernels.load_cpu_kernels(tmp_path) is None
    assert "cpu kernels unavailable" in caplog.text
    assert not [p for p in (tmp_path / "kernels").iterdir() if not p.name.endswith(".lock")]


def _bf16_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=192, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256)
    return LlamaForCausalLM(config).to(BF16).eval()


def test_fused_forward_uses_the_kernels(kernel):
    """A bf16 Llama with head size 64: padded prefill, then decode steps over the padded buffer, with the
    kernels and with torch's ops fed the same tokens: logits agree to bf16 rounding."""
    model = _bf16_llama()
    with_kernel = models.build_fast(model, 4, pack=False, kernels=kernel)
    plain = Llama(model, 4, pack=False)
    assert with_kernel is not None and with_kernel.kernel_attention and with_kernel.kernel_norm
    assert plain.kernels is None and not plain.kernel_attention and not plain.kernel_norm
    head = model.get_output_embeddings()
    prompts = [[5, 17, 33, 2, 9, 100], [7, 8], [250, 1, 3, 4]]
    inputs = prefill_inputs(prompts, torch.device("cpu"))
    caches = [SlotCache(2), SlotCache(2)]
    with torch.inference_mode():
        for fast, cache in zip((with_kernel, plain), caches):
            fast(inputs.input_ids, inputs.attention, inputs.position_ids, cache)
        mask, positions = inputs.mask, inputs.mask.sum(dim=1)
        nxt = torch.tensor([11, 12, 13])
        for _ in range(5):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], dim=1)
            got, want = (head(fast(nxt[:, None], mask[:, None, None, :], positions[:, None], cache)[:, -1]).float()
                         for fast, cache in zip((with_kernel, plain), caches))
            assert ((got - want).abs().mean() / want.abs().mean()) < 2e-2
            nxt, positions = want.argmax(-1), positions + 1


def test_load_model_builds_the_kernel_for_bf16_on_cpu_only(tiny_model_dir, tmp_path):
    from common.model_files import resolve
    from worker.model import load_model

    def kernels_built(cache: str) -> list[str]:
        return sorted(p.name for p in (tmp_path / cache / "kernels").rglob("*.so"))

    fp32 = load_model(resolve(str(tiny_model_dir)), str(tmp_path / "fp32"), "cpu", "fp32", 1)
    off = load_model(resolve(str(tiny_model_dir)), str(tmp_path / "off"), "cpu", "bf16", 1, cpu_kernels=False)
    loaded = load_model(resolve(str(tiny_model_dir)), str(tmp_path / "bf16"), "cpu", "bf16", 1)
    # fp32: only the portable paged attention (worker/cpu_paged.py); bf16: the AVX-512 kernels too.
    assert kernels_built("fp32") == ["paged_attention.so"] and kernels_built("off") == []
    assert kernels_built("bf16") == ["cpu_kernels.so", "paged_attention.so"]
    assert loaded.fast is not None and loaded.fast.kernel_norm
    assert not loaded.fast.kernel_attention  # head size 16: the AVX-512 attention is not built for it...
    assert loaded.fast.paged_kernel is not None and fp32.fast.paged_kernel is not None  # ...the portable one is
    assert off.fast.paged_kernel is None and not off.fast.kernel_attention


def test_greedy_choice_is_torch_argmax_and_log_softmax(kernel):
    g = torch.Generator().manual_seed(6)
    logits = (5 * torch.randn(4, 3, 1000 + 7, generator=g)).to(BF16)  # a vocabulary not a multiple of 16
    logits[1, -1, 500] = logits[1, -1, 900] = logits[1, -1].max() + 1  # a tie: the first index wins
    logits[2, -1, 1003] = 40.0  # the maximum in the tail past the last 16 columns
    rows = logits[:, -1]  # prefill logits: rows 3 * V apart
    ids, logprobs = kernel.greedy(rows)
    assert torch.equal(ids, torch.argmax(rows.float(), dim=-1)) and int(ids[1]) == 500
    want = torch.log_softmax(rows.float(), dim=-1).gather(1, ids[:, None]).squeeze(1)
    assert torch.allclose(logprobs, want, rtol=1e-6, atol=1e-6)


def test_greedy_choice_of_masked_rows(kernel):
    """An output constraint leaves a few finite logits among -inf (and large negative ones): the same
    argmax and logprob as torch's (the exp below -86 stays a normal float, see cpu_kernels.cpp)."""
    g = torch.Generator().manual_seed(7)
    logits = (4 * torch.randn(3, 49152, generator=g)).to(BF16)
    logits[0, :] = float("-inf")
    logits[0, [11, 4000, 49151]] = torch.tensor([1.5, -2.0, 0.25]).to(BF16)
    logits[1, ::2] = float("-inf")
    logits[2, 100:] = -200.0  # far below the maximum: each term under e^-86
    ids, logprobs = kernel.greedy(logits)
    assert torch.equal(ids, torch.argmax(logits.float(), dim=-1))
    want = torch.log_softmax(logits.float(), dim=-1).gather(1, ids[:, None]).squeeze(1)
    assert torch.allclose(logprobs, want, rtol=1e-6, atol=1e-6)


def test_greedy_choice_of_degenerate_rows(kernel):
    logits = torch.zeros(3, 64, dtype=BF16)
    logits[0, 7], logits[0, 9] = float("nan"), 5.0  # torch.argmax: the NaN
    logits[1] = float("-inf")
    logits[2, 3] = float("inf")
    ids, logprobs = kernel.greedy(logits)
    assert ids.tolist() == torch.argmax(logits.float(), dim=-1).tolist() == [7, 0, 3]
    assert torch.isnan(logprobs).all() and torch.log_softmax(logits.float(), dim=-1)[[0, 1, 2], ids].isnan().all()


def test_engine_takes_plain_greedy_rows_through_the_kernel(tiny_model_dir, tmp_path):
    """A bf16 model on CPU: the same tokens, logprobs and top alternatives as torch's choice, for plain
    greedy batches (a row asking for alternatives stays plain); a batch with a sampled, penalised or
    watermarked row keeps the reference path."""
    from common.model_files import resolve
    from common.schemas import SamplingParams
    from worker.model import load_model
    from worker import processors
    from worker.chooser import plain_greedy
    from worker.sampling import SamplingBatch
    from worker.watermark import Watermark

    from .test_engine import PROMPTS, job, run_engine

    loaded = load_model(resolve(str(tiny_model_dir)), str(tmp_path), "cpu", "bf16", 1)
    assert loaded.fast.kernel_greedy

    def tokens(arrivals):
        eng, _, sink = run_engine(loaded, arrivals)
        return eng, {rid: [(e.token.id, e.token.logprob, e.token.top) for e in sink.events_for(rid)]
                     for rid in "abc"}

    def arrivals():
        return {0: [job("a", PROMPTS[0], n=6), job("b", PROMPTS[1], n=4)],
                2: [job("c", PROMPTS[2], n=5, top_n_tokens=4)]}

    eng, with_kernel = tokens(arrivals())
    assert eng.chooser.greedy_kernel is not None
    loaded.fast.kernel_greedy = False
    eng, reference = tokens(arrivals())
    assert eng.chooser.greedy_kernel is None
    seen, counts, watermark = torch.zeros(2, 64, dtype=torch.bool), torch.zeros(2, 64), Watermark(64)

    def plain(params):
        sb = SamplingBatch.build(params, [None, None], "cpu")
        return plain_greedy(sb, processors.for_batch(sb, seen, counts, [0, 0], watermark))

    for special in ({"do_sample": True}, {"repetition_penalty": 1.2}, {"watermark": True}, {"top_k": 5},
                    {"frequency_penalty": 0.5}, {"presence_penalty": -0.5}):
        assert not plain([SamplingParams(), SamplingParams(**special)])
    assert plain([SamplingParams(), SamplingParams(top_n_tokens=5)])
    for rid, want in reference.items():
        got = with_kernel[rid]
        assert len(got) == len(want) > 3
        assert [t for t, _, _ in got] == [t for t, _, _ in want]
        assert all(abs(a - b) < 1e-5 for (_, a, _), (_, b, _) in zip(got, want))
        for (_, _, top), (_, _, reference_top) in zip(got, want):
            assert [t.id for t in top] == [t.id for t in reference_top] and len(top) == (4 if rid == "c" else 0)
            assert all(abs(t.logprob - r.logprob) < 1e-5 for t, r in zip(top, reference_top))


def test_paged_attention_reads_scrambled_blocks_as_the_dense_kernel_reads_a_buffer(kernel):
    """The paged cache's layout: each row's columns in blocks of 16 anywhere in a pool, through its block table."""
    rows, n_q, n_kv, d, columns, bs = 5, 9, 3, 64, 45, 16
    q, kbuf, vbuf, bias = _inputs(rows, n_q, n_kv, d, columns, seed=3)
    blocks = -(-columns // bs)
    tables = torch.randperm(rows * blocks + 2)[:rows * blocks].view(rows, blocks)
    pools = []
    for buf in (kbuf, vbuf):
        wide = torch.zeros(rows, n_kv, blocks * bs, d, dtype=BF16)
        wide[:, :, :columns] = buf
        pool = torch.full((rows * blocks + 2, n_kv, bs, d), 1e4).to(BF16)  # unused blocks: huge, never read
        pool[tables.reshape(-1)] = wide.view(rows, n_kv, blocks, bs, d).transpose(1, 2).reshape(-1, n_kv, bs, d)
        pools.append(pool)
    wide_bias = torch.full((rows, blocks * bs), float("-inf"), dtype=BF16)
    wide_bias[:, :columns] = bias
    want = kernel.attention(q, kbuf, vbuf, bias, 0.125)
    got = kernel.paged_attention(q, pools[0], pools[1], tables, wide_bias, 0.125)
    assert torch.equal(got, want)
