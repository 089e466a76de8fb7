"""A decode-oriented forward pass for Llama-architecture models, on the weights transformers loaded.

At 32 rows a decode step of SmolLM2 on CPU runs ~60 small tensor ops per layer through
transformers' modules (norms in four steps, rotary embeddings once for q and once for k, separate
q/k/v and gate/up projections, the attention kernel of a 3-query GQA group). Each costs a few
microseconds of dispatch on a [32, 576] tensor, so together they cost about as much as the
attention and a fifth of the step. This forward does the same arithmetic in fewer ops, the way
serving engines lay out their models:

- q, k and v come from one projection (weights concatenated once), and so do gate and up;
- the rotary embedding is applied to q and k together, in the projection's own layout;
- for one new token per row, attention runs as two batched matmuls over the KV cache's whole
  buffer (contiguous, so nothing is copied), with the columns outside each row's window masked.
  That is transformers' "eager" attention arithmetic (scores as a bf16 matmul, softmax in fp32);
  prompts (several tokens per row) go through torch's scaled_dot_product_attention as in
  transformers' default path;
- each residual add is done with the norm after it, and the layer hands its normed output to the
  next layer;
- on CPU in bf16, the decode attention, the add + norm and the rotary embedding run as small C++
  kernels (worker/cpu_kernels.py) that compute what these torch ops compute, in one pass each;
- `decode_in_place` is the same decode step with its state in device tensors only, so that a
  CUDA graph can record it (worker/graphs.py).

The norms, rotary tables and residual adds compute the same values as transformers' Llama code
(the norm output is bit-identical in bf16); `build` checks the logits of a probe against
transformers' own forward and declines (the caller keeps transformers' forward) if they differ.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_kernels import CpuKernels
from .kvcache import SlotCache, SlotLayer
from .packed import PackedLinear

log = logging.getLogger(__name__)

Linear = Callable[[torch.Tensor], torch.Tensor]
MAX_TABLE_POSITIONS = 32768  # rotary cos/sin tables cover at most this many positions (bf16: 8 MB at D=64)


def _plain(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    return lambda x: F.linear(x, weight, bias)


def _cat_bias(*linears: nn.Module) -> torch.Tensor | None:
    biases = [getattr(m, "bias", None) for m in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else torch.zeros(m.weight.shape[0], dtype=m.weight.dtype,
                                                          device=m.weight.device)
                      for b, m in zip(biases, linears)])


def _share(fused: torch.Tensor, *linears: nn.Linear) -> None:
    """Point each linear's weight at its rows of `fused` (the concatenation of their weights)."""
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(fused[start:start + rows], requires_grad=False)
        start += rows


def unsupported_reason(model: Any) -> str | None:
    """Why this model cannot use FastLlama (None: it can)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", "") != "llama":
        return f"model type {getattr(cfg, 'model_type', None)!r} is not 'llama'"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return "no decoder layers found"
    for layer in layers:
        if not all(isinstance(m, nn.Linear) for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                       layer.self_attn.v_proj, layer.self_attn.o_proj,
                                                       layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)):
            return "projections are not plain nn.Linear"
    return None


def fill_column_bias(bias: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
    """Fill `bias` [R, C] in place: 0 where mask [r, W] is True at column start + w, -inf elsewhere."""
    bias.fill_(float("-inf"))
    bias[:mask.shape[0], start:start + mask.shape[1]].masked_fill_(mask, 0.0)
    return bias


@dataclass
class _Layer:
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear
    norm1: torch.Tensor
    norm2: torch.Tensor


class FastLlama:
    """The decoder of a Llama model as fused projections; returns final-normed hidden states."""

    def __init__(self, model: Any, rows_hint: int, pack: bool, kernels: CpuKernels | None = None) -> None:
        cfg = model.config
        decoder = model.model
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.final_norm = decoder.norm.weight
        self.eps = float(cfg.rms_norm_eps)
        self.n_q = int(cfg.num_attention_heads)
        self.n_kv = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_q)
        self.inter = int(cfg.intermediate_size)
        self.scale = float(decoder.layers[0].self_attn.scaling)
        # Scaling by a power of two is exact, so scale and mask can join the scores' matmul (one
        # baddbmm, rounded once) and still give the same bf16 scores as matmul, * scale, + mask.
        self.fold_scale = math.frexp(self.scale)[0] == 0.5
        self._cos, self._sin = self._rope_tables(cfg)
        # Compiled bf16 CPU kernels (worker/cpu_kernels.py) for the decode attention, the residual adds
        # with the norms, the rotary embedding and greedy choices, where they handle the shapes; else torch's ops.
        weight = self.embed.weight
        usable = weight.device.type == "cpu" and weight.dtype == torch.bfloat16
        self.kernels = kernels if usable else None
        self.kernel_attention = self.kernels is not None and self.kernels.handles_attention(
            self.n_q, self.n_kv, self.head_dim)
        self.kernel_norm = self.kernels is not None and self.kernels.handles_norm(int(cfg.hidden_size))
        self.kernel_rope = self.kernels is not None and self.kernels.handles_rope(self.head_dim)
        self.kernel_greedy = self.kernels is not None  # for the engine's plain greedy rows

        def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
            if pack:
                return PackedLinear(weight, bias, rows_hint)
            return _plain(weight, bias)

        self.layers: list[_Layer] = []
        for layer in decoder.layers:
            att, mlp = layer.self_attn, layer.mlp
            qkv_w = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
            gu_w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            if not pack:  # transformers' layers read views of the fused weights: no second copy
                _share(qkv_w, att.q_proj, att.k_proj, att.v_proj)
                _share(gu_w, mlp.gate_proj, mlp.up_proj)
            o = linear(att.o_proj.weight, att.o_proj.bias)
            down = linear(mlp.down_proj.weight, mlp.down_proj.bias)
            if pack:  # transformers' layers use the same packed o and down projections: one copy each
                att.o_proj, mlp.down_proj = o, down
            self.layers.append(_Layer(
                qkv=linear(qkv_w, _cat_bias(att.q_proj, att.k_proj, att.v_proj)), o=o,
                gate_up=linear(gu_w, _cat_bias(mlp.gate_proj, mlp.up_proj)), down=down,
                norm1=layer.input_layernorm.weight, norm2=layer.post_attention_layernorm.weight))
        # The norm after layer i: layer i + 1's input norm, the final norm after the last layer.
        self._next_norms = [nxt.norm1 for nxt in self.layers[1:]] + [self.final_norm]

    def _rope_tables(self, cfg: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """cos/sin of every position, computed once by transformers' own rotary module (the same
        elementwise values it computes per call), for rotary types that do not depend on the length."""
        if getattr(self.rotary, "rope_type", "default") in ("dynamic", "longrope"):
            return None, None
        positions = min(int(getattr(cfg, "max_position_embeddings", 0) or 0), MAX_TABLE_POSITIONS)
        if positions <= 0:
            return None, None
        weight = self.embed.weight
        probe = torch.zeros(1, 1, dtype=weight.dtype, device=weight.device)
        cos, sin = self.rotary(probe, torch.arange(positions, device=weight.device)[None])
        return cos[0], sin[0]

    def _rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._cos, self._sin
        if cos is None or sin is None or x.device.type != "cpu" or int(position_ids.max()) >= cos.shape[0]:
            return self.rotary(x, position_ids)
        return cos[position_ids], sin[position_ids]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # transformers' LlamaRMSNorm: normalise in fp32, round to the input dtype, then scale.
        if self.kernel_norm:
            return self.kernels.rms_norm(x, weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * weight

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream x + delta, and its norm."""
        if self.kernel_norm:
            return self.kernels.add_rms_norm(x, delta, weight, self.eps)
        x = x + delta
        return x, self._norm(x, weight)

    def _rope(self, qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        if self.kernel_rope:
            return self.kernels.rope(qk, cos, signed_sin)
        return self._torch_rope(qk, cos, signed_sin)

    @staticmethod
    def _torch_rope(qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """transformers' q * cos + rotate_half(q) * sin, with rotate_half's negation moved into the sin
        table (`signed_sin`: its first half negated, once per forward): -a * b == a * -b exactly."""
        half = qk.shape[-1] // 2
        rotated = torch.cat((qk[..., half:], qk[..., :half]), dim=-1)
        return qk * cos + rotated * signed_sin

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: SlotCache) -> torch.Tensor:
        """Hidden states [B, T, H] after the final norm; `attention_mask` is [B, 1, T, window] bool."""
        b, t = input_ids.shape
        x = self.embed(input_ids)
        cos, sin = self._rotary(x, position_ids)
        cos, sin = self._rope_factors(cos, sin)
        column_bias: torch.Tensor | None = None
        grouped_bias: torch.Tensor | None = None
        h = self._norm(x, self.layers[0].norm1)
        for i, (layer, slots) in enumerate(zip(self.layers, cache.slot_layers)):
            q, k, v = self._project(layer, h, cos, sin)
            keys, values = slots.update(k, v)
            if t == 1:
                if column_bias is None or column_bias.shape[-1] != slots.kbuf.shape[2]:
                    column_bias = self._column_bias(attention_mask, slots)
                    grouped_bias = None if self.kernel_attention else self._grouped_bias(column_bias)
                if self.kernel_attention:
                    attn = self.kernels.attention(q, slots.kbuf[:b], slots.vbuf[:b], column_bias, self.scale)
                else:
                    attn = self._decode_attention(q, slots.kbuf[:b], slots.vbuf[:b], grouped_bias)
            else:
                attn = self._prefill_attention(q, keys, values, attention_mask)
            x, h = self._finish(layer, x, attn, self._next_norms[i])
        return h

    @torch.inference_mode()
    def decode_in_place(self, input_ids: torch.Tensor, position_ids: torch.Tensor, column_bias: torch.Tensor,
                        column: torch.Tensor, buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """A decode step with no host-side state: what a CUDA graph can capture (worker/graphs.py).

        Row i of `input_ids` [R, 1] writes its keys/values into column `column` ([1] long, on the device)
        of rows [:R] of each layer's (kbuf, vbuf) and attends over all their columns with the additive
        `column_bias` [R, C] (0 or -inf). The same arithmetic as `__call__`'s decode path. Returns the
        final-normed hidden states [R, 1, H]."""
        rows = column_bias.shape[0]
        x = self.embed(input_ids)
        cos, sin = self._rope_factors(self._cos[position_ids], self._sin[position_ids])
        bias = self._grouped_bias(column_bias)
        h = self._norm(x, self.layers[0].norm1)
        for layer, (kbuf, vbuf), next_norm in zip(self.layers, buffers, self._next_norms):
            q, k, v = self._project(layer, h, cos, sin)
            kbuf, vbuf = kbuf[:rows], vbuf[:rows]
            kbuf.index_copy_(2, column, k)
            vbuf.index_copy_(2, column, v)
            x, h = self._finish(layer, x, self._decode_attention(q, kbuf, vbuf, bias), next_norm)
        return h

    @property
    def rope_positions(self) -> int:
        """Positions the rotary tables cover (0 without tables)."""
        return 0 if self._cos is None else int(self._cos.shape[0])

    @staticmethod
    def _rope_factors(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, D] cos/sin -> [B, T, 1, D] (broadcast over heads), sin's first half negated for `_rope`."""
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos.unsqueeze(2), sin.unsqueeze(2)

    def _project(self, layer: _Layer, normed: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention's inputs from the layer's normed input: q [B, n_q, T, D], rotated k and v [B, n_kv, T, D]."""
        b, t, _ = normed.shape
        n_q, n_kv = self.n_q, self.n_kv
        qkv = layer.qkv(normed).view(b, t, n_q + 2 * n_kv, self.head_dim)
        qk = self._rope(qkv[:, :, :n_q + n_kv], cos, sin)
        return (qk[:, :, :n_q].transpose(1, 2), qk[:, :, n_q:].transpose(1, 2),
                qkv[:, :, n_q + n_kv:].transpose(1, 2))

    def _finish(self, layer: _Layer, x: torch.Tensor, attn: torch.Tensor,
                next_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's output projection and MLP, each with its residual: the residual stream, and its
        norm with `next_norm` (the next layer's input norm, or the final norm)."""
        x, h = self._add_norm(x, layer.o(attn), layer.norm2)
        gu = layer.gate_up(h)
        return self._add_norm(x, layer.down(F.silu(gu[..., :self.inter]) * gu[..., self.inter:]), next_norm)

    @staticmethod
    def _column_bias(mask: torch.Tensor, slots: SlotLayer) -> torch.Tensor:
        """Additive mask [R, C] over the buffer's columns: 0 where the row attends, -inf elsewhere (exact in bf16)."""
        rows, columns = mask.shape[0], slots.kbuf.shape[2]
        bias = torch.empty((rows, columns), dtype=slots.kbuf.dtype, device=mask.device)
        return fill_column_bias(bias, mask.reshape(rows, -1), slots.start)

    def _grouped_bias(self, column_bias: torch.Tensor) -> torch.Tensor:
        """[R, C] -> [R * n_kv, groups, C]: laid out as the grouped scores, so it can be baddbmm's input."""
        rows, columns = column_bias.shape
        groups = self.n_q // self.n_kv
        return column_bias[:, None, None, :].expand(rows, self.n_kv, groups, columns).reshape(
            rows * self.n_kv, groups, columns)

    def _decode_attention(self, q: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor,
                          bias: torch.Tensor) -> torch.Tensor:
        """One query per row: q [B, n_q, 1, D] against the rows' whole (contiguous) buffers [B, n_kv, C, D].

        transformers' eager arithmetic: scores as a matmul in the model dtype, scaled there, plus the
        mask; the softmax computes in fp32 internally and rounds its output to the model dtype."""
        b, n_kv, d = q.shape[0], self.n_kv, self.head_dim
        columns = kbuf.shape[2]
        keys = kbuf.view(b * n_kv, columns, d)
        values = vbuf.view(b * n_kv, columns, d)
        # Query head h reads KV head h // groups (transformers' repeat_kv): group them per KV head.
        grouped = q.reshape(b * n_kv, self.n_q // n_kv, d)
        if self.fold_scale:
            scores = torch.baddbmm(bias, grouped, keys.transpose(1, 2), alpha=self.scale)
        else:
            scores = torch.bmm(grouped, keys.transpose(1, 2)).mul_(self.scale).add_(bias)
        probs = torch.softmax(scores, dim=-1)
        return torch.bmm(probs, values).view(b, 1, self.n_q * d)

    def _prefill_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
        groups = self.n_q // self.n_kv
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
        b, _, t, _ = q.shape
        return out.transpose(1, 2).reshape(b, t, self.n_q * self.head_dim)


@torch.inference_mode()
def _probe_logits(model: Any, fast: FastLlama | None, ids: torch.Tensor) -> torch.Tensor:
    """Logits of every position of `ids` [1, n]: the prompt but its last token, then that token as a decode step."""
    from .batch import prefill_inputs

    if fast is None:
        return model(input_ids=ids).logits.float()
    n = ids.shape[1]
    head = model.get_output_embeddings()
    cache = SlotCache(len(fast.layers))
    inputs = prefill_inputs([ids[0, :-1].tolist()], ids.device)
    first = fast(inputs.input_ids, inputs.attention, inputs.position_ids, cache)
    mask = torch.ones(1, 1, 1, n, dtype=torch.bool, device=ids.device)
    last = fast(ids[:, -1:], mask, torch.tensor([[n - 1]], device=ids.device), cache)
    return head(torch.cat([first, last], dim=1)).float()


def probe_deviation(model: Any, fast: FastLlama) -> float:
    """Mean |difference| of the probe's logits (fused vs transformers), relative to their mean size."""
    ids = (torch.arange(3, 19, dtype=torch.long, device=model.device) * 7919 % model.config.vocab_size)[None]
    want = _probe_logits(model, None, ids)
    got = _probe_logits(model, fast, ids)
    return ((want - got).abs().mean() / want.abs().mean().clamp(min=1e-6)).item()


def build_fast(model: Any, rows_hint: int, pack: bool, kernels: CpuKernels | None = None) -> FastLlama | None:
    """A FastLlama for `model` if it is a Llama whose probe logits match transformers' (else None).

    The same arithmetic up to rounding (fused projections accumulate in another order; the decode
    path rounds attention scores to the model dtype, as transformers' eager attention does). In
    bf16 that rounding alone moves logits by ~1% (transformers' own sdpa and eager forwards differ
    from an fp32 run by as much), while a structural mismatch (rotary variant, head grouping)
    moves them by their own size.
    """
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("transformers' forward kept: %s", reason)
        return None
    fast = FastLlama(model, rows_hint, pack, kernels)
    _check_kernels(fast)
    err = probe_deviation(model, fast)
    tolerance = 1e-4 if model.dtype == torch.float32 else 5e-2
    if not err <= tolerance:
        log.warning("fused forward differs from transformers' (mean deviation %.2g > %.2g); not used",
                    err, tolerance)
        return None
    log.info("fused Llama forward in use (probe mean deviation %.2g)", err)
    return fast


KERNEL_TOLERANCE = 1e-2  # largest difference from torch's ops, relative to the outputs' mean size


def _deviation(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return ((want - got).abs().max() / want.abs().mean().clamp(min=1e-6)).item()


def _check_kernels(fast: FastLlama) -> None:
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
        fast.kernel_attention = _keep("decode attention", kernels.attention(q, kbuf, vbuf, bias, fast.scale),
                                      fast._decode_attention(q, kbuf, vbuf, fast._grouped_bias(bias)))
    if fast.kernel_norm:
        weight, x, delta = fast.final_norm, 3 * rand(7, fast.final_norm.shape[0]), rand(7, fast.final_norm.shape[0])
        total, normed = kernels.add_rms_norm(x, delta, weight, fast.eps)
        fast.kernel_norm = (_keep("residual add", total, x + delta) and _keep(
            "rms norm", normed, F.rms_norm(x + delta, (x.shape[-1],), eps=fast.eps) * weight))
    if fast.kernel_rope:
        heads, d = fast.n_q + fast.n_kv, fast.head_dim
        qk = rand(3, 2, heads + fast.n_kv, d)[:, :, :heads]
        cos, sin = rand(3, 2, 1, d), rand(3, 2, 1, d)
        fast.kernel_rope = _keep("rotary embedding", kernels.rope(qk, cos, sin), fast._torch_rope(qk, cos, sin))
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
