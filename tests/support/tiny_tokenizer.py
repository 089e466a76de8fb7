"""A small real `tokenizers` tokenizer for API tests: one token per word or punctuation run,
plus a BOS token `<s>` when special tokens are added, so token counts are easy to predict."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors

WORDS = ["hello", "world", "the", "a", "b", "c", "liveness", "x", "y", "z", ".", ",", "!"]


def build(unk: bool = True) -> Tokenizer:
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2} if unk else {"<s>": 0, "</s>": 1}
    for word in WORDS:
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def write_model_dir(path: Path) -> Path:
    """A directory `common.model_files.resolve` accepts: config.json + tokenizer.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    build().save(str(path / "tokenizer.json"))
    return path
