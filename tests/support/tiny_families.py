"""Tiny random checkpoints of each decoder family with a fused forward (worker/models/), as HF model directories.

Small enough to build in a fraction of a second, yet each exercises what sets its family apart:
Llama 3's rope scaling, Mistral's sliding window, Qwen2's q/k/v biases and mixed window layers,
Qwen3's q/k norms with a head_dim unlike hidden/heads, Gemma's +1 norms, GeLU and scaled
embeddings, Gemma 2's soft-caps (set low enough here to bite) and alternating windows, Phi-3's
fused projections and a partial rotary embedding. Windows are 8 tokens, shorter than the tests'
longer prompts. Norm weights and biases are randomised too, so a norm computed the wrong way shows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

FAMILY_SEED = 4321
WINDOW = 8

_COMMON: dict[str, Any] = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               tie_word_embeddings=True, initializer_range=0.08)


def family_configs() -> dict[str, Any]:
    """model_type -> a tiny transformers config of that family."""
    from transformers import (Gemma2Config, GemmaConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config)

    return {
        "llama": LlamaConfig(**_COMMON, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}),
        "mistral": MistralConfig(**_COMMON, sliding_window=WINDOW),
        "qwen2": Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        "qwen3": Qwen3Config(**_COMMON, head_dim=32),
        "gemma": GemmaConfig(**_COMMON, head_dim=32),
        "gemma2": Gemma2Config(**_COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                               attn_logit_softcapping=1.0, final_logit_softcapping=2.0),
        "phi3": Phi3Config(**_COMMON, partial_rotary_factor=0.5, pad_token_id=0),
    }


def build_family_model(kind: str, path: Path | str, cache_dir: str = "") -> Path:
    """Save a deterministic tiny model of family `kind` plus SmolLM2's tokenizer into `path` (usable as --model)."""
    return save_random_model(family_configs()[kind], path, cache_dir)


def save_random_model(config: Any, path: Path | str, cache_dir: str = "", seed: int = FAMILY_SEED) -> Path:
    """A seeded random causal LM of `config` (norm weights and biases randomised as well) with SmolLM2's
    tokenizer, saved into `path` as a HF model directory."""
    import torch
    from transformers import AutoModelForCausalLM

    from .tiny_model import smollm2_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = smollm2_tokenizer(cache_dir)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
