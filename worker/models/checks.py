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

KERNEL_TOLERANCE = 1e-2  # largest difference from torch's ops, relative to the outputs' mean size


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
        # The same rows laid out as a paged pool: blocks of 8 columns in a scrambled order, one spare.
        blocks = -(-columns // 8)
        order = torch.randperm(rows * blocks + 1, generator=g)[:rows * blocks].view(rows, blocks)
        padded = blocks * 8
        k_pool = torch.zeros(rows * blocks + 1, fast.n_kv, 8, d, dtype=torch.bfloat16)
        v_pool = torch.zeros_like(k_pool)
        for name, pool, buf in (("k", k_pool, kbuf), ("v", v_pool, vbuf)):
            wide = torch.zeros(rows, fast.n_kv, padded, d, dtype=torch.bfloat16)
            wide[:, :, :columns] = buf
            pool[order.reshape(-1)] = wide.view(rows, fast.n_kv, blocks, 8, d).transpose(1, 2).reshape(-1, fast.n_kv, 8, d)
        wide_bias = torch.full((rows, padded), float("-inf"), dtype=torch.bfloat16)
        wide_bias[:, :columns] = bias
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


def _keep(what: str, got: torch.Tensor, want: torch.Tensor) -> bool:
    err = _deviation(got, want)
    if err <= KERNEL_TOLERANCE:
        log.info("%s: compiled kernel (largest deviation from torch's ops %.2g)", what, err)
        return True
    log.warning("%s: compiled kernel differs from torch's ops (%.2g > %.2g); torch's kept", what, err,
                KERNEL_TOLERANCE)
    return False
