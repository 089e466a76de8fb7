"""Loads the tokenizer and causal LM and runs its forward passes (the only module touching transformers' model classes)."""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.model_files import ModelSource, build_once, cache_root, ensure_tokenizer, model_dir

from .cpu_kernels import load_cpu_kernels
from .cpu_paged import load_paged_attention
from .graphs import DecodeGraphs
from .paged.graphs import PagedDecodeGraphs
from .models import build_fast, head_logits
from .models.base import layer_windows
from .models.layers import sliding_mask
from .packed import prepack, prepacking_available

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedModel:
    """Everything the engine needs to know about the resident model."""
    model: Any  # a transformers PreTrainedModel (causal LM), in eval mode on `device`
    tokenizer: Any  # a transformers PreTrainedTokenizerFast
    eos_token_id: int | None
    special_ids: frozenset[int]
    vocab_size: int  # logit width (may exceed the tokenizer's vocabulary)
    device: torch.device
    dtype: torch.dtype
    model_id: str = ""
    fast: Any = None  # a models.FusedDecoder when the family has one and it matched transformers' logits
    graphs: Any = None  # a DecodeGraphs running decode steps as CUDA graphs (CUDA with `fast` only)
    paged_graphs: Any = None  # the same for decode steps through the paged KV cache (paged.graphs.PagedDecodeGraphs)
    logit_softcap: float | None = None  # the config's final_logit_softcapping (Gemma 2), on every path


def parse_dtype(name: str) -> torch.dtype:
    """Map the settings' dtype names to torch dtypes."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def configure_threads(threads: int) -> None:
    """Pin torch's intra-op threads (others may share the cores) and keep inter-op at one."""
    if threads <= 0:
        return
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable once per process, before any inter-op work
        log.debug("inter-op threads already fixed; left as they are")


def _convert_gguf(source: ModelSource, out: Path) -> None:
    """Dequantize a GGUF to an fp32 HF directory once (reading GGUF takes ~20 s; the copy loads in ~1 s)."""
    # Built by hand rather than from_pretrained(gguf_file=...), which insists on `accelerate`.
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    t0 = time.monotonic()
    print(f"tgq: converting {source.path.name} to a Hugging Face model (once, ~20 s)...",
          file=sys.stderr, flush=True)
    config = AutoConfig.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain dequantized fp32 tensors
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(source.path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    print("tgq: writing the converted weights...", file=sys.stderr, flush=True)
    model.save_pretrained(str(out))
    print(f"tgq: model converted in {time.monotonic() - t0:.1f} s -> {out}", file=sys.stderr, flush=True)


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """All ids the tokenizer marks special (named specials and added tokens flagged special)."""
    ids = set(int(i) for i in tokenizer.all_special_ids)
    for idx, added in tokenizer.added_tokens_decoder.items():
        if getattr(added, "special", False):
            ids.add(int(idx))
    return frozenset(ids)


def load_model(source: ModelSource, cache_dir: str, device: str, dtype: str, threads: int,
               rows_hint: int = 32, fused: bool = True, cuda_graphs: bool = True,
               cpu_kernels: bool = True) -> LoadedModel:
    """Load tokenizer and model (converting a GGUF once into the cache) onto `device` in `dtype`.

    With `fused`, a model of a family in worker/models/ also gets tgq's fused forward, used by
    `forward` when it matched transformers' logits on a probe; on CUDA, with `cuda_graphs`, its
    decode steps are then replayed as CUDA graphs (worker/graphs.py); on CPU in bf16, with
    `cpu_kernels`, its decode attention, norms, rotary embedding and greedy choice run as compiled
    kernels (worker/cpu_kernels.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    configure_threads(threads)
    torch_dtype = parse_dtype(dtype)
    tok_dir = ensure_tokenizer(source, cache_dir)
    if source.is_gguf:
        weights_dir = build_once(model_dir(source, cache_dir), lambda tmp: _convert_gguf(source, tmp))
    else:
        weights_dir = source.path
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    model = AutoModelForCausalLM.from_pretrained(str(weights_dir), dtype=torch_dtype)
    dev = torch.device(device)
    model = model.to(dev).eval()
    model.requires_grad_(False)
    log.info("loaded %s (%s, %s) in %.1f s", weights_dir, dtype, dev, time.monotonic() - t0)
    width = int(model.get_output_embeddings().weight.shape[0])
    pack = prepacking_available(dev, torch_dtype)
    kernels = paged_kernel = None
    if fused and cpu_kernels and dev.type == "cpu":
        if torch_dtype == torch.bfloat16:
            kernels = load_cpu_kernels(cache_root(cache_dir))
        paged_kernel = load_paged_attention(cache_root(cache_dir))
    fast = build_fast(model, max(1, rows_hint), pack, kernels, paged_kernel) if fused else None
    if pack and prepack(model, max(1, rows_hint), width):
        log.info("linear layers prepacked for oneDNN (bf16 on CPU)")
    graphs = paged_graphs = None
    if cuda_graphs and dev.type == "cuda" and DecodeGraphs.usable(fast):
        graphs = DecodeGraphs(fast, model.get_output_embeddings(), fast.final_softcap)
        paged_graphs = PagedDecodeGraphs(fast, model.get_output_embeddings(), fast.final_softcap)
        log.info("decode steps run as CUDA graphs")
    return LoadedModel(model=model, tokenizer=tokenizer, eos_token_id=tokenizer.eos_token_id,
                       special_ids=special_token_ids(tokenizer), vocab_size=width, device=dev,
                       dtype=torch_dtype, model_id=source.model_id, fast=fast, graphs=graphs,
                       paged_graphs=paged_graphs,
                       logit_softcap=getattr(model.config, "final_logit_softcapping", None) or None)


def decoder_masks(model: Any, mask: torch.Tensor) -> Any:
    """tgq's 4-D bool mask as transformers' decoder takes a prepared one (it uses it as it is): additive
    for eager attention (Gemma 2's), and limited to the sliding window on the layers that have one,
    as a mask per layer type where the family mixes them (Qwen2, Gemma 2)."""
    cfg = model.config
    if getattr(cfg, "_attn_implementation", "sdpa") == "eager":
        as_passed = lambda m: torch.zeros(m.shape, dtype=model.dtype, device=m.device).masked_fill_(
            ~m, torch.finfo(model.dtype).min)
    else:
        as_passed = lambda m: m
    windows = set(layer_windows(cfg, int(cfg.num_hidden_layers)))
    if windows == {None}:
        return as_passed(mask)
    sliding = as_passed(sliding_mask(mask, next(w for w in windows if w is not None)))
    if None not in windows:
        return sliding
    return {"full_attention": as_passed(mask), "sliding_attention": sliding}


@dataclass
class ForwardOut:
    """Logits of the kept positions ([B, kept, V], model dtype) and the updated cache."""
    logits: torch.Tensor
    cache: Any


@torch.inference_mode()
def forward(loaded: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            position_ids: torch.Tensor, cache: Any, logits_to_keep: int = 1,
            keep: torch.Tensor | None = None) -> ForwardOut:
    """One model call; `attention_mask` is a prepared 4D bool mask [B, 1, q, kv] (True = attend).

    The LM head runs here on a contiguous 2-D slice of the hidden states: given the strided
    [B, 1, H] slice that transformers passes, torch broadcasts the [V, H] head into a [B, H, V]
    copy for a bmm (783 ms of a 1.3 s prefill at B=8 on this CPU).
    """
    model = loaded.model
    if loaded.paged_graphs is not None and loaded.paged_graphs.accepts(input_ids, cache):
        return ForwardOut(logits=loaded.paged_graphs(input_ids, position_ids, cache), cache=cache)
    if loaded.graphs is not None and loaded.graphs.accepts(input_ids, attention_mask, cache):
        return ForwardOut(logits=loaded.graphs(input_ids, attention_mask, position_ids, cache), cache=cache)
    if loaded.fast is not None:
        hidden = loaded.fast(input_ids, attention_mask, position_ids, cache)
    else:
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=decoder_masks(model, attention_mask),
                                     position_ids=position_ids, cache=cache, use_cache=True).last_hidden_state
    if keep is not None:  # these positions only (a packed prefill's last prompt positions)
        hidden = hidden[:, keep, :]
    elif logits_to_keep:
        hidden = hidden[:, -logits_to_keep:, :]
    b, t, h = hidden.shape
    head = model.get_output_embeddings()
    logits = head_logits(head, hidden.reshape(b * t, h).contiguous(), loaded.logit_softcap).view(b, t, loaded.vocab_size)
    return ForwardOut(logits=logits, cache=cache)
