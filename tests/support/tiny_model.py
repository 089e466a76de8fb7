"""A tiny random Llama with the SmolLM2 tokenizer: a real HF model directory that builds in ~0.1 s."""
from __future__ import annotations

from pathlib import Path

TINY_SEED = 1234


def build_tiny_model(path: Path | str, cache_dir: str = "", max_shard_size: str = "50GB") -> Path:
    """Save a deterministic tiny LlamaForCausalLM plus SmolLM2's tokenizer into `path` (usable as --model).

    A `max_shard_size` under the weights' ~12.6 MB saves them sharded, with model.safetensors.index.json."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from common.model_files import ensure_tokenizer, resolve

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_tokenizer(resolve("smollm2"), cache_dir)))
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(TINY_SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(str(path), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(path))
    return path
