"""Layers the fused decoders share: norms, rotary embeddings, masks and attention arithmetic.

Each computes what transformers' modules compute for the families that use it, in fewer ops; the
families (worker/models/<family>.py) pick among them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


# ---- norms ----------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalise in fp32, round to the input dtype, then scale in that dtype."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps) * weight


def offset_rms_norm(x: torch.Tensor, weight_plus_one: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: normalise and scale by (1 + weight) in fp32, then round once.

    `weight_plus_one` is 1 + weight in fp32, computed once at load."""
    return (F.rms_norm(x.float(), (x.shape[-1],), eps=eps) * weight_plus_one).to(x.dtype)


# ---- rotary embeddings ----------------------------------------------------------------------------

def rope_factors(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, R] cos/sin -> [B, T, 1, R] (broadcast over heads), sin's first half negated for `rope`."""
    half = sin.shape[-1] // 2
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.unsqueeze(2), sin.unsqueeze(2)


def rope(qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' q * cos + rotate_half(q) * sin on the first R = cos.shape[-1] dims of each head
    (all of them but for partial rotary embeddings, as in Phi-3.5), the rest passed through.

    rotate_half's negation lives in the sin table (`signed_sin`, see `rope_factors`): -a * b == a * -b."""
    width = cos.shape[-1]
    rot = qk[..., :width]
    half = width // 2
    rotated = torch.cat((rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * signed_sin
    if width == qk.shape[-1]:
        return out
    return torch.cat((out, qk[..., width:]), dim=-1)


# ---- masks ----------------------------------------------------------------------------------------

def fill_column_bias(bias: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
    """Fill `bias` [R, C] in place: 0 where mask [r, W] is True at column start + w, -inf elsewhere."""
    bias.fill_(NEG_INF)
    bias[:mask.shape[0], start:start + mask.shape[1]].masked_fill_(mask, 0.0)
    return bias


def sliding_column_bias(bias: torch.Tensor, last: torch.Tensor | int, window: int) -> torch.Tensor:
    """`bias` [R, C] with the columns a sliding window of `window` tokens no longer sees also at -inf.

    Every row's newest token is in column `last` (rows are right-aligned in the KV buffers, each
    row's tokens contiguous), so key column j is in the window iff last - j < window. `last` may be a
    [1] device tensor (no host sync: CUDA graphs capture this)."""
    columns = torch.arange(bias.shape[-1], device=bias.device)
    return bias.masked_fill(columns <= last - window, NEG_INF)


def sliding_mask(mask: torch.Tensor, window: int) -> torch.Tensor:
    """A [B, 1, T, K] bool mask (True = attend) further limited to the last `window` tokens.

    The T queries are the last T key columns, so query t sits in column K - T + t."""
    t, k = mask.shape[-2], mask.shape[-1]
    queries = torch.arange(k - t, k, device=mask.device)[:, None]
    keys = torch.arange(k, device=mask.device)[None, :]
    # A padding query attends to its own column only: that column stays in every window.
    return mask & (queries - keys < window)


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma 2's soft-capping: cap * tanh(x / cap), in transformers' order of ops."""
    return torch.tanh(x / cap) * cap


# ---- attention ------------------------------------------------------------------------------------

def grouped_bias(column_bias: torch.Tensor, n_q: int, n_kv: int) -> torch.Tensor:
    """[R, C] -> [R * n_kv, groups, C]: laid out as the grouped scores, so it can be baddbmm's input."""
    rows, columns = column_bias.shape
    groups = n_q // n_kv
    return column_bias[:, None, None, :].expand(rows, n_kv, groups, columns).reshape(rows * n_kv, groups, columns)


def decode_attention(q: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, bias: torch.Tensor,
                     scale: float, fold_scale: bool, softcap: float | None = None) -> torch.Tensor:
    """One query per row: q [B, n_q, 1, D] against the rows' whole (contiguous) buffers [B, n_kv, C, D],
    with `bias` from `grouped_bias`. Returns [B, 1, n_q * D].

    transformers' eager arithmetic: scores as a matmul in the model dtype, scaled there (soft-capped
    where the family does), plus the mask; the softmax computes in fp32 internally and rounds its
    output to the model dtype."""
    b, n_q, _, d = q.shape
    n_kv, columns = kbuf.shape[1], kbuf.shape[2]
    keys = kbuf.view(b * n_kv, columns, d)
    values = vbuf.view(b * n_kv, columns, d)
    # Query head h reads KV head h // groups (transformers' repeat_kv): group them per KV head.
    grouped = q.reshape(b * n_kv, n_q // n_kv, d)
    if softcap is not None:
        scores = soft_cap(torch.bmm(grouped, keys.transpose(1, 2)).mul_(scale), softcap).add_(bias)
    elif fold_scale:
        # Scaling by a power of two is exact: scale and mask join the matmul (one baddbmm, rounded once).
        scores = torch.baddbmm(bias, grouped, keys.transpose(1, 2), alpha=scale)
    else:
        scores = torch.bmm(grouped, keys.transpose(1, 2)).mul_(scale).add_(bias)
    probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, values).view(b, 1, n_q * d)


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      scale: float, softcap: float | None = None) -> torch.Tensor:
    """Several queries per row: q [B, n_q, T, D] against keys/values [B, n_kv, K, D] under a bool mask
    [B, 1, T, K]. torch's scaled_dot_product_attention as transformers' sdpa path, or, with a
    soft-cap (which sdpa cannot apply), transformers' eager arithmetic. Returns [B, T, n_q * D]."""
    b, n_q, t, d = q.shape
    groups = n_q // keys.shape[1]
    if groups > 1:
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
    if softcap is None:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    else:
        scores = soft_cap(torch.matmul(q, keys.transpose(2, 3)) * scale, softcap).masked_fill(~mask, NEG_INF)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, values)
    return out.transpose(1, 2).reshape(b, t, n_q * d)
