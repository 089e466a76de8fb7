"""Before a fused decoder is used: its logits against transformers' own, and each compiled kernel against torch's ops."""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from ..kvcache import SlotCache
from . import layers as L
from .base import FusedDecoder

log = logging.getLogger(__name__)

KERNEL_TOLERANCE = 1e-2  # largest difference from torch's ops, relative to the outputs' mean size (bf16)
FP32_KERNEL_TOLERANCE = 1e-4  # the same in fp32, where only the order of additions differs


def head_logits(head: torch.nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """The LM head's logits, soft-capped where the family caps them (Gemma 2)."""
    logits = head(hidden)
    return logits if softcap is None else L.soft_cap(logits, softcap)


@torch.inference_mode()
def probe_logits(model: Any, fast: FusedDecoder | None, ids: torch.Tensor) -> torch.Tensor:
    """Logits of every position of `ids` [1, n]: the prompt but its last token, then that token as a decode step."""
    from ..batch import prefill_inputs

    if fast is None:
        return model(input_ids=ids).logits.float()
    n = ids.shape[1]
    head = model.get_output_embeddings()
    cache = SlotCache(len(fast.layers))
    inputs = prefill_inputs([ids[0, :-1].tolist()], ids.device)
    first = fast(inputs.input_ids, inputs.attention, inputs.position_ids, cache)
    mask = torch.ones(1, 1, 1, n, dtype=torch.bool, device=ids.device)
    last = fast(ids[:, -1:], mask, torch.tensor([[n - 1]], device=ids.device), cache)
    return head_logits(head, torch.cat([first, last], dim=1), fast.final_softcap).float()


def probe_deviation(model: Any, fast: FusedDecoder) -> float:
    """Mean |difference| of the probe's logits (fused vs transformers), relative to their mean size.

    16 tokens: longer than the sliding windows of the tests' tiny configs, so those are probed too."""
    ids = (torch.arange(3, 19, dtype=torch.long, device=model.device) * 7919 % model.config.vocab_size)[None]
    want = probe_logits(model, None, ids)
    got = probe_logits(model, fast, ids)
    return ((want - got).abs().mean() / want.abs().mean().clamp(min=1e-6)).item()


def accepted(model: Any, fast: FusedDecoder) -> bool:
    """Keep the kernels that compute torch's ops, then `fast` itself if its probe logits match transformers'.

    The same arithmetic up to rounding (fused projections accumulate in another order; the decode
    path rounds attention scores to the model dtype, as transformers' eager attention does). In
    bf16 that rounding alone moves logits by ~1% (transformers' own sdpa and eager forwards differ
    from an fp32 run by as much), while a structural mismatch (rotary variant, head grouping)
    moves them by their own size."""
    check_kernels(fast)
    check_paged_kernel(fast)
    err = probe_deviation(model, fast)
    tolerance = 1e-4 if model.dtype == torch.float32 else 5e-2
    if not err <= tolerance:
        log.warning("fused forward differs from transformers' (mean deviation %.2g > %.2g); not used",
                    err, tolerance)
        return False
    log.info("fused %s forward in use (probe mean deviation %.2g)", type(fast).__name__, err)
    return True


def _deviation(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return ((want - got).abs().max() / want.abs().mean().clamp(min=1e-6)).item()


def check_kernels(fast: FusedDecoder) -> None:
    """Keep each compiled kernel only if it computes what torch's ops compute, on random inputs."""
    kernels = fast.kernels
    if kernels is None:
        return
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    if fast.kernel_attention:
        rows, columns, d = 5, 37, fast.head_dim
        q = rand(rows, 1, fast.n_q + 2 * fast.n_kv, d)[:, :, :fast.n_q].transpose(1, 2)  # the projection's layout
        kbuf, vbuf = rand(rows, fast.n_kv, columns, d), rand(rows, fast.n_kv, columns, d)
        bias = torch.zeros(rows, columns, dtype=torch.bfloat16)
        bias[:, 30:] = float("-inf")  # spare columns past the window
        bias[1, :9] = float("-inf")  # a shorter row's left padding
        want = fast._decode_attention(q, kbuf, vbuf, L.grouped_bias(bias, fast.n_q, fast.n_kv))
        k_pool, v_pool, order, wide_bias = paged_copy(kbuf, vbuf, bias, 8, g)
        fast.kernel_attention = (
            _keep("decode attention", kernels.attention(q, kbuf, vbuf, bias, fast.scale), want)
            and _keep("paged decode attention",
                      kernels.paged_attention(q, k_pool, v_pool, order, wide_bias, fast.scale), want))
    if fast.kernel_norm:
        weight, x, delta = fast.final_norm, 3 * rand(7, fast.final_norm.shape[0]), rand(7, fast.final_norm.shape[0])
        total, normed = kernels.add_rms_norm(x, delta, weight, fast.eps)
        fast.kernel_norm = (_keep("residual add", total, x + delta) and _keep(
            "rms norm", normed, F.rms_norm(x + delta, (x.shape[-1],), eps=fast.eps) * weight))
    if fast.kernel_rope:
        heads, d = fast.n_q + fast.n_kv, fast.head_dim
        qk = rand(3, 2, heads + fast.n_kv, d)[:, :, :heads]
        cos, sin = rand(3, 2, 1, d), rand(3, 2, 1, d)
        fast.kernel_rope = _keep("rotary embedding", kernels.rope(qk, cos, sin), L.rope(qk, cos, sin))
    if fast.kernel_greedy:
        logits = 4 * rand(3, 1000)
        ids, logprobs = kernels.greedy(logits)
        want = torch.log_softmax(logits.float(), dim=-1).gather(1, ids[:, None]).squeeze(1)
        fast.kernel_greedy = (torch.equal(ids, torch.argmax(logits.float(), dim=-1))
                              and _keep("greedy choice", logprobs, want))


def check_paged_kernel(fast: FusedDecoder) -> None:
    """Keep the portable paged decode attention only if it computes torch's ops' attention (over the
    same rows gathered dense) on random inputs in the model's dtype."""
    kernel = fast.paged_kernel
    if kernel is None:
        return
    g = torch.Generator().manual_seed(1)
    dtype = fast.embed.weight.dtype
    rows, columns, d = 5, 37, fast.head_dim
    q = torch.randn(rows, 1, fast.n_q + 2 * fast.n_kv, d, generator=g).to(dtype)[:, :, :fast.n_q].transpose(1, 2)
    kbuf, vbuf = (torch.randn(rows, fast.n_kv, columns, d, generator=g).to(dtype) for _ in range(2))
    bias = torch.zeros(rows, columns, dtype=dtype)
    bias[:, 30:] = float("-inf")
    bias[1, :9] = float("-inf")
    want = fast._decode_attention(q, kbuf, vbuf, L.grouped_bias(bias, fast.n_q, fast.n_kv))
    k_pool, v_pool, tables, wide_bias = paged_copy(kbuf, vbuf, bias, 8, g)
    got = kernel(q, k_pool, v_pool, tables, wide_bias, fast.scale, fast.attn_softcap)
    tolerance = KERNEL_TOLERANCE if dtype == torch.bfloat16 else FP32_KERNEL_TOLERANCE
    if not _keep("paged decode attention (portable)", got, want, tolerance):
        fast.paged_kernel = None


def paged_copy(kbuf: torch.Tensor, vbuf: torch.Tensor, bias: torch.Tensor, block_size: int,
               g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense rows kbuf/vbuf [R, n_kv, C, D] with their bias [R, C] laid out as a paged pool: blocks of
    `block_size` columns in a scrambled order, one block spare. Returns (k_pool, v_pool, tables [R, W],
    the bias widened to W * block_size columns with -inf)."""
    rows, n_kv, columns, d = kbuf.shape
    blocks = -(-columns // block_size)
    padded = blocks * block_size
    order = torch.randperm(rows * blocks + 1, generator=g)[:rows * blocks].view(rows, blocks)
    pools = []
    for buf in (kbuf, vbuf):
        wide = torch.zeros(rows, n_kv, padded, d, dtype=buf.dtype)
        wide[:, :, :columns] = buf
        pool = torch.zeros(rows * blocks + 1, n_kv, block_size, d, dtype=buf.dtype)
        pool[order.reshape(-1)] = wide.view(rows, n_kv, blocks, block_size, d).transpose(1, 2).reshape(
            -1, n_kv, block_size, d)
        pools.append(pool)
    wide_bias = torch.full((rows, padded), float("-inf"), dtype=bias.dtype)
    wide_bias[:, :columns] = bias
    return pools[0], pools[1], order, wide_bias


def _keep(what: str, got: torch.Tensor, want: torch.Tensor, tolerance: float = KERNEL_TOLERANCE) -> bool:
    err = _deviation(got, want)
    if err <= tolerance:
        log.info("%s: compiled kernel (largest deviation from torch's ops %.2g)", what, err)
        return True
    log.warning("%s: compiled kernel differs from torch's ops (%.2g > %.2g); torch's kept", what, err, tolerance)
    return False
