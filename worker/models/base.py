"""The fused decoder every family builds on: the forward with the KV cache, and its in-place decode step.

At 32 rows a decode step of a small model on CPU runs ~60 small tensor ops per layer through
transformers' modules (norms in four steps, rotary embeddings once for q and once for k, separate
q/k/v and gate/up projections, the attention kernel of a small GQA group). Each costs a few
microseconds of dispatch on a [32, 576] tensor, so together they cost about as much as the
attention and a fifth of the step. This forward does the same arithmetic in fewer ops, the way
serving engines lay out their models:

- q, k and v come from one projection (weights concatenated once, unless the checkpoint already
  has them fused), and so do gate and up;
- the rotary embedding is applied to q and k together, in the projection's own layout;
- for one new token per row, attention runs as two batched matmuls over the KV cache's whole
  buffer (contiguous, so nothing is copied), with the columns outside each row's window masked
  (layers with a sliding window mask the columns it has left too). That is transformers' "eager"
  attention arithmetic; prompts (several tokens per row) go through torch's
  scaled_dot_product_attention as in transformers' default path;
- each residual add is done with the norm after it, and the layer hands its normed output to the
  next layer;
- on CPU in bf16, the decode attention, the add + norm and the rotary embedding run as small C++
  kernels (worker/cpu_kernels.py) where the family's arithmetic is theirs;
- `decode_in_place` is the same decode step with its state in device tensors only, so that a
  CUDA graph can record it (worker/graphs.py).

A family (worker/models/<family>.py) says which configs it takes and where its checkpoint keeps
each weight, and overrides the steps its architecture does differently: `_project` (q/k/v and the
rotary embedding), `_attend`, `_finish` (output projection, MLP and residuals), `_norm`.
`worker/models/checks.py` compares the result with transformers' logits before it is used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu_kernels import CpuKernels
from ..kvcache import SlotCache, SlotLayer
from ..packed import PackedLinear
from ..cpu_paged import PagedAttention
from ..paged.cache import DecodeStep, PagedCache, PrefillStep, decode_biases
from . import layers as L

Linear = Callable[[torch.Tensor], torch.Tensor]
MAX_TABLE_POSITIONS = 32768  # rotary cos/sin tables cover at most this many positions (bf16: 8 MB at D=64)


def _plain(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    return lambda x: F.linear(x, weight, bias)


def cat_bias(*linears: nn.Module) -> torch.Tensor | None:
    """The biases of linears whose weights are concatenated (zeros for those without; None if none has one)."""
    biases = [getattr(m, "bias", None) for m in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else torch.zeros(m.weight.shape[0], dtype=m.weight.dtype,
                                                          device=m.weight.device)
                      for b, m in zip(biases, linears)])


def share(fused: torch.Tensor, *linears: nn.Linear) -> None:
    """Point each linear's weight at its rows of `fused` (the concatenation of their weights)."""
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(fused[start:start + rows], requires_grad=False)
        start += rows


def layer_windows(cfg: Any, layers: int) -> list[int | None]:
    """Each layer's sliding window in tokens (None: full attention), as transformers reads the config:
    `layer_types` names the sliding layers where the config has it, else a `sliding_window` holds for all."""
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return [None] * layers
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return [int(window)] * layers
    return [int(window) if kind == "sliding_attention" else None for kind in types]


@dataclass
class Weights:
    """Where one decoder layer's projections are: fused q/k/v and gate/up as tensors, o and down as modules."""
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    o: nn.Linear
    down: nn.Linear


@dataclass
class Layer:
    """One decoder layer as the fused forward uses it."""
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear
    norm1: torch.Tensor  # before attention
    norm2: torch.Tensor  # before the MLP
    window: int | None  # sliding window (tokens), None for full attention
    extras: tuple[torch.Tensor, ...] = ()  # the family's own tensors (`layer_extras`)


class FusedDecoder:
    """A decoder as fused projections; `__call__` returns final-normed hidden states."""

    model_types: ClassVar[tuple[str, ...]] = ()
    norm_kernel: ClassVar[bool] = True  # the family's norm is Llama's (the compiled kernel computes it)
    attn_softcap: float | None = None
    final_softcap: float | None = None  # applied to the logits by worker/model.py

    @classmethod
    def unsupported(cls, model: Any) -> str | None:
        """Why this family's forward cannot run `model` (None: it can)."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        if not layers:
            return "no decoder layers found"
        for layer in layers:
            try:
                weights = cls.weights(layer)
            except AttributeError as exc:
                return f"a layer lacks a projection ({exc})"
            if not all(isinstance(m, nn.Linear) for m in (weights.o, weights.down)):
                return "projections are not plain nn.Linear"
        return None

    @staticmethod
    def weights(layer: nn.Module) -> Weights:
        """Llama's layout: separate q/k/v and gate/up projections, concatenated here."""
        att, mlp = layer.self_attn, layer.mlp
        for m in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):
            if not isinstance(m, nn.Linear):
                raise AttributeError(f"{type(m).__name__} is not nn.Linear")
        qkv = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        return Weights(qkv=qkv, qkv_bias=cat_bias(att.q_proj, att.k_proj, att.v_proj),
                       gate_up=gate_up, gate_up_bias=cat_bias(mlp.gate_proj, mlp.up_proj),
                       o=att.o_proj, down=mlp.down_proj)

    @staticmethod
    def share_weights(layer: nn.Module, weights: Weights) -> None:
        """Point transformers' separate projections at views of the fused weights: no second copy."""
        share(weights.qkv, layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
        share(weights.gate_up, layer.mlp.gate_proj, layer.mlp.up_proj)

    @staticmethod
    def activation(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return layer.mlp.act_fn

    def __init__(self, model: Any, rows_hint: int, pack: bool, kernels: CpuKernels | None = None,
                 paged_kernel: PagedAttention | None = None) -> None:
        cfg = model.config
        decoder = model.model
        first = decoder.layers[0]
        self.embed = decoder.embed_tokens  # Gemma's module scales the embeddings itself
        self.rotary = decoder.rotary_emb
        self.eps = float(cfg.rms_norm_eps)
        self.n_q = int(cfg.num_attention_heads)
        self.n_kv = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(first.self_attn, "head_dim", None) or cfg.hidden_size // self.n_q)
        self.inter = int(cfg.intermediate_size)
        self.scale = float(first.self_attn.scaling)
        self.act = self.activation(first)
        self.fold_scale = math.frexp(self.scale)[0] == 0.5
        self.final_norm = self.norm_weight(decoder.norm)
        self._cos, self._sin = self._rope_tables(cfg)
        rotary_width = self.head_dim if self._cos is None else int(self._cos.shape[-1])
        # Compiled bf16 CPU kernels (worker/cpu_kernels.py) for the decode attention, the residual adds
        # with the norms, the rotary embedding and greedy choices, where they compute this family's
        # arithmetic and handle the shapes; else torch's ops.
        weight = self.embed.weight
        usable = weight.device.type == "cpu" and weight.dtype == torch.bfloat16
        self.kernels = kernels if usable else None
        self.kernel_attention = (self.kernels is not None and self.attn_softcap is None
                                 and self.kernels.handles_attention(self.n_q, self.n_kv, self.head_dim))
        self.kernel_norm = (self.kernels is not None and self.norm_kernel
                            and self.kernels.handles_norm(int(cfg.hidden_size)))
        self.kernel_rope = (self.kernels is not None and rotary_width == self.head_dim
                            and self.kernels.handles_rope(self.head_dim))
        self.kernel_greedy = self.kernels is not None  # for the engine's plain greedy rows
        # The portable compiled decode attention through the paged cache's block tables (worker/cpu_paged.py),
        # where the AVX-512 one is not in use: fp32, other CPUs, soft-capped scores.
        handled = paged_kernel is not None and paged_kernel.handles(self.n_q, self.n_kv, self.head_dim, weight.dtype)
        self.paged_kernel = paged_kernel if handled and weight.device.type == "cpu" else None

        def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
            if pack:
                return PackedLinear(weight, bias, rows_hint)
            return _plain(weight, bias)

        windows = layer_windows(cfg, len(decoder.layers))
        self.layers: list[Layer] = []
        for layer, window in zip(decoder.layers, windows):
            w = self.weights(layer)
            if not pack:
                self.share_weights(layer, w)
            o, down = linear(w.o.weight, w.o.bias), linear(w.down.weight, w.down.bias)
            if pack:  # transformers' layers use the same packed o and down projections: one copy each
                layer.self_attn.o_proj, layer.mlp.down_proj = o, down
            self.layers.append(Layer(qkv=linear(w.qkv, w.qkv_bias), o=o, gate_up=linear(w.gate_up, w.gate_up_bias),
                                     down=down, norm1=self.norm_weight(layer.input_layernorm),
                                     norm2=self.norm_weight(layer.post_attention_layernorm),
                                     window=window, extras=self.layer_extras(layer)))
        self.windows = sorted({lyr.window for lyr in self.layers if lyr.window is not None})
        # The norm after layer i: layer i + 1's input norm, the final norm after the last layer.
        self._next_norms = [nxt.norm1 for nxt in self.layers[1:]] + [self.final_norm]

    # ---- the family's arithmetic (overridden where an architecture differs) ------------------------

    def layer_extras(self, layer: nn.Module) -> tuple[torch.Tensor, ...]:
        """Tensors of transformers' `layer` that the family's own steps read (kept in `Layer.extras`)."""
        return ()

    def norm_weight(self, norm: nn.Module) -> torch.Tensor:
        """The tensor `_norm` scales by, from transformers' norm module."""
        return norm.weight

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.kernel_norm:
            return self.kernels.rms_norm(x, weight, self.eps)
        return L.rms_norm(x, weight, self.eps)

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream x + delta, and its norm."""
        if self.kernel_norm:
            return self.kernels.add_rms_norm(x, delta, weight, self.eps)
        x = x + delta
        return x, self._norm(x, weight)

    def _rope(self, qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        if self.kernel_rope:
            return self.kernels.rope(qk, cos, signed_sin)
        return L.rope(qk, cos, signed_sin)

    def _project(self, layer: Layer, normed: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention's inputs from the layer's normed input: q [B, n_q, T, D], rotated k and v [B, n_kv, T, D]."""
        b, t, _ = normed.shape
        n_q, n_kv = self.n_q, self.n_kv
        qkv = layer.qkv(normed).view(b, t, n_q + 2 * n_kv, self.head_dim)
        qk = self._rope(self._qk_heads(layer, qkv[:, :, :n_q + n_kv]), cos, sin)
        return (qk[:, :, :n_q].transpose(1, 2), qk[:, :, n_q:].transpose(1, 2),
                qkv[:, :, n_q + n_kv:].transpose(1, 2))

    def _qk_heads(self, layer: Layer, qk: torch.Tensor) -> torch.Tensor:
        """q and k heads [B, T, n_q + n_kv, D] before the rotary embedding (Qwen3 norms them here)."""
        return qk

    def _mlp(self, layer: Layer, h: torch.Tensor) -> torch.Tensor:
        gu = layer.gate_up(h)
        return layer.down(self.act(gu[..., :self.inter]) * gu[..., self.inter:])

    def _finish(self, layer: Layer, x: torch.Tensor, attn: torch.Tensor,
                next_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's output projection and MLP, each with its residual: the residual stream, and its
        norm with `next_norm` (the next layer's input norm, or the final norm)."""
        x, h = self._add_norm(x, layer.o(attn), layer.norm2)
        return self._add_norm(x, self._mlp(layer, h), next_norm)

    def _decode_attention(self, q: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor,
                          bias: torch.Tensor) -> torch.Tensor:
        """Decode attention with a grouped bias (torch's ops)."""
        return L.decode_attention(q, kbuf, vbuf, bias, self.scale, self.fold_scale, self.attn_softcap)

    # ---- rotary tables ---------------------------------------------------------------------------

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

    @property
    def rope_positions(self) -> int:
        """Positions the rotary tables cover (0 without tables)."""
        return 0 if self._cos is None else int(self._cos.shape[0])

    # ---- the forward -----------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: SlotCache) -> torch.Tensor:
        """Hidden states [B, T, H] after the final norm; `attention_mask` is [B, 1, T, window] bool (a
        PagedCache ignores it: its step says what each row attends to)."""
        if isinstance(cache, PagedCache):
            return self._paged(input_ids, position_ids, cache)
        b, t = input_ids.shape
        x = self.embed(input_ids)
        cos, sin = L.rope_factors(*self._rotary(x, position_ids))
        masks = {None: attention_mask}
        if t > 1:
            masks.update({w: L.sliding_mask(attention_mask, w) for w in self.windows})
        biases: dict[int | None, torch.Tensor] = {}
        h = self._norm(x, self.layers[0].norm1)
        for i, (layer, slots) in enumerate(zip(self.layers, cache.slot_layers)):
            q, k, v = self._project(layer, h, cos, sin)
            keys, values = slots.update(k, v)
            if t == 1:
                if not biases or next(iter(biases.values())).shape[-1] != slots.kbuf.shape[2]:
                    biases = self._decode_biases(self._column_bias(attention_mask, slots), slots.end - 1)
                attn = self._attend_decode(q, slots.kbuf[:b], slots.vbuf[:b], biases[layer.window])
            else:
                attn = L.prefill_attention(q, keys, values, masks[layer.window], self.scale, self.attn_softcap)
            x, h = self._finish(layer, x, attn, self._next_norms[i])
        return h

    def _decode_biases(self, column_bias: torch.Tensor, last: torch.Tensor | int) -> dict[int | None, torch.Tensor]:
        """The additive masks of a decode step per window (None: full attention), [R, C] for the
        compiled kernel, else grouped for torch's ops."""
        biases = {None: column_bias}
        biases.update({w: L.sliding_column_bias(column_bias, last, w) for w in self.windows})
        if self.kernel_attention:
            return biases
        return {w: L.grouped_bias(bias, self.n_q, self.n_kv) for w, bias in biases.items()}

    def _attend_decode(self, q: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor,
                       bias: torch.Tensor) -> torch.Tensor:
        if self.kernel_attention:
            return self.kernels.attention(q, kbuf, vbuf, bias, self.scale)
        return self._decode_attention(q, kbuf, vbuf, bias)

    @torch.inference_mode()
    def decode_in_place(self, input_ids: torch.Tensor, position_ids: torch.Tensor, column_bias: torch.Tensor,
                        column: torch.Tensor, buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """A decode step with no host-side state: what a CUDA graph can capture (worker/graphs.py).

        Row i of `input_ids` [R, 1] writes its keys/values into column `column` ([1] long, on the device)
        of rows [:R] of each layer's (kbuf, vbuf) and attends over all their columns with the additive
        `column_bias` [R, C] (0 or -inf). The same arithmetic as `__call__`'s decode path (torch's ops).
        Returns the final-normed hidden states [R, 1, H]."""
        rows = column_bias.shape[0]
        x = self.embed(input_ids)
        cos, sin = L.rope_factors(self._cos[position_ids], self._sin[position_ids])
        biases = {None: column_bias}
        biases.update({w: L.sliding_column_bias(column_bias, column, w) for w in self.windows})
        grouped = {w: L.grouped_bias(bias, self.n_q, self.n_kv) for w, bias in biases.items()}
        h = self._norm(x, self.layers[0].norm1)
        for layer, (kbuf, vbuf), next_norm in zip(self.layers, buffers, self._next_norms):
            q, k, v = self._project(layer, h, cos, sin)
            kbuf, vbuf = kbuf[:rows], vbuf[:rows]
            kbuf.index_copy_(2, column, k)
            vbuf.index_copy_(2, column, v)
            attn = self._decode_attention(q, kbuf, vbuf, grouped[layer.window])
            x, h = self._finish(layer, x, attn, next_norm)
        return h

    # ---- the forward over a paged cache -----------------------------------------------------------

    def _paged(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: PagedCache) -> torch.Tensor:
        """The forward through the paged cache: a prefill of packed prompt tokens [1, N] laid out by the
        cache's PrefillStep, else a decode step of one token per row [B, 1]."""
        x = self.embed(input_ids)
        cos, sin = L.rope_factors(*self._rotary(x, position_ids))
        step = cache.step if isinstance(cache.step, PrefillStep) else cache.begin_decode(self.windows, x.dtype)
        kv = cache.kv
        grouped = masks = None
        if isinstance(step, DecodeStep) and not (self.kernel_attention or self.paged_kernel):
            grouped = {w: L.grouped_bias(bias, self.n_q, self.n_kv) for w, bias in step.biases.items()}
        elif isinstance(step, PrefillStep):
            masks = self._prefill_masks(step, x.device)
        h = self._norm(x, self.layers[0].norm1)
        for i, layer in enumerate(self.layers):
            q, k, v = self._project(layer, h, cos, sin)
            if isinstance(step, DecodeStep):
                kv.write(i, step.slots, k[:, :, 0], v[:, :, 0])
                # The compiled kernels read the blocks through the tables; torch's ops need a dense copy.
                if self.kernel_attention:
                    attn = self.kernels.paged_attention(q, kv.keys[i], kv.values[i], step.tables,
                                                        step.biases[layer.window], self.scale)
                elif self.paged_kernel is not None:
                    attn = self.paged_kernel(q, kv.keys[i], kv.values[i], step.tables, step.biases[layer.window],
                                             self.scale, self.attn_softcap)
                else:
                    keys, values = kv.gather(i, step.tables)
                    attn = self._decode_attention(q, keys, values, grouped[layer.window])
            else:
                kv.write(i, step.slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
                attn = self._paged_prefill_attention(i, q, kv, step, [m[layer.window] for m in masks])
            x, h = self._finish(layer, x, attn, self._next_norms[i])
        return h

    @torch.inference_mode()
    def decode_in_place_paged(self, input_ids: torch.Tensor, position_ids: torch.Tensor, slots: torch.Tensor,
                              tables: torch.Tensor, lengths: torch.Tensor, kv: Any) -> torch.Tensor:
        """A decode step through the paged cache with its state in device tensors only (what a CUDA
        graph can capture, worker/paged/graphs.py): row i writes slot `slots[i]` and attends over the
        first `lengths[i]` tokens of its blocks `tables[i]`. The arithmetic of `_paged`'s decode
        (torch's ops). Returns the final-normed hidden states [R, 1, H]."""
        x = self.embed(input_ids)
        cos, sin = L.rope_factors(self._cos[position_ids], self._sin[position_ids])
        biases = decode_biases(lengths, tables.shape[1] * kv.block_size, self.windows, x.dtype)
        grouped = {w: L.grouped_bias(bias, self.n_q, self.n_kv) for w, bias in biases.items()}
        h = self._norm(x, self.layers[0].norm1)
        for i, layer in enumerate(self.layers):
            q, k, v = self._project(layer, h, cos, sin)
            kv.write(i, slots, k[:, :, 0], v[:, :, 0])
            keys, values = kv.gather(i, tables)
            x, h = self._finish(layer, x, self._decode_attention(q, keys, values, grouped[layer.window]),
                                self._next_norms[i])
        return h

    def _prefill_masks(self, step: PrefillStep, device: torch.device) -> list[dict[int | None, torch.Tensor]]:
        """Per row, its causal mask [1, 1, n, length] (its n new queries are the last n of its context),
        and the same limited to each sliding window: built once per forward, shared by the layers."""
        out = []
        for n, length in zip(step.counts, step.lengths):
            queries = torch.arange(length - n, length, device=device)[:, None]
            causal = (torch.arange(length, device=device)[None, :] <= queries)[None, None]
            out.append({None: causal, **{w: L.sliding_mask(causal, w) for w in self.windows}})
        return out

    def _paged_prefill_attention(self, layer: int, q: torch.Tensor, kv: Any, step: PrefillStep,
                                 masks: list[torch.Tensor]) -> torch.Tensor:
        """Each row's new queries against its whole context (cached prefix, earlier chunks, these tokens)."""
        out = []
        for start, n, length, table, mask in zip(step.starts, step.counts, step.lengths, step.tables, masks):
            keys, values = kv.gather(layer, table[None])
            out.append(L.prefill_attention(q[:, :, start:start + n], keys[:, :, :length], values[:, :, :length],
                                           mask, self.scale, self.attn_softcap))
        return torch.cat(out, dim=1)

    @staticmethod
    def _column_bias(mask: torch.Tensor, slots: SlotLayer) -> torch.Tensor:
        """Additive mask [R, C] over the buffer's columns: 0 where the row attends, -inf elsewhere (exact in bf16)."""
        rows, columns = mask.shape[0], slots.kbuf.shape[2]
        bias = torch.empty((rows, columns), dtype=slots.kbuf.dtype, device=mask.device)
        return L.fill_column_bias(bias, mask.reshape(rows, -1), slots.start)
