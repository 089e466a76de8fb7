"""A Hugging Face Hub cache built by hand, in the Hub's own layout, for tests that resolve `org/name`:

    <cache>/models--org--name/blobs/<sha256>            the files' contents
    <cache>/models--org--name/refs/<branch>             a commit hash
    <cache>/models--org--name/snapshots/<commit>/<file> a relative symlink to its blob
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


def repo_dir(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def add_snapshot(cache: Path, repo_id: str, files: Path, branch: str | None = "main",
                 salt: str = "") -> str:
    """Put the files of the directory `files` into `cache` as one commit of `repo_id`; point `branch`
    (None: no branch) at it. Returns the commit hash, derived from the contents and `salt`."""
    repo = repo_dir(cache, repo_id)
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    commit_digest = hashlib.sha1(salt.encode())
    blobs = {}
    for src in sorted(p for p in files.rglob("*") if p.is_file()):
        data = src.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        blob = repo / "blobs" / sha
        if not blob.exists():
            shutil.copyfile(src, blob)
        rel = src.relative_to(files)
        blobs[rel] = blob
        commit_digest.update(f"{rel}:{sha}\n".encode())
    commit = commit_digest.hexdigest()  # 40 hex digits, like a git commit
    snapshot = repo / "snapshots" / commit
    for rel, blob in blobs.items():
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    if branch is not None:
        ref = repo / "refs" / branch
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)  # no newline, as huggingface_hub writes it
    return commit


def template_into_config(path: Path, template: str | None = None) -> str:
    """Put the chat template into tokenizer_config.json's `chat_template` (the layout of many Hub
    repos) instead of chat_template.jinja: `template`, else the one chat_template.jinja held."""
    jinja = path / "chat_template.jinja"
    if template is None:
        template = jinja.read_text(encoding="utf-8")
    jinja.unlink(missing_ok=True)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return template


@dataclass(frozen=True)
class HubModel:
    """A model in a hand-built Hub cache: `repo_id` at `main` and, one commit apart, at branch `dev`."""
    cache: Path
    repo_id: str
    files: Path  # the same files as a plain local directory
    main: str  # commit of refs/main
    dev: str  # commit of refs/dev

    def snapshot(self, commit: str) -> Path:
        return repo_dir(self.cache, self.repo_id) / "snapshots" / commit

    def env(self) -> dict[str, str]:
        """The variables that point huggingface_hub (and tgq) at this cache, offline."""
        return {"HF_HUB_CACHE": str(self.cache), "HF_HUB_OFFLINE": "1"}


TINY_REPO = "tgq-tests/tiny-llama"


def build_hub_model(root: Path, repo_id: str = TINY_REPO) -> HubModel:
    """The tiny random Llama saved sharded (3 shards + model.safetensors.index.json), its tokenizer's
    chat template in tokenizer_config.json, as `repo_id` in a Hub cache under `root`."""
    from .tiny_model import build_tiny_model

    files = build_tiny_model(root / "files", max_shard_size="200KB")
    template_into_config(files)
    cache = root / "hub"
    main = add_snapshot(cache, repo_id, files)
    dev = add_snapshot(cache, repo_id, files, branch="dev", salt="dev")
    return HubModel(cache, repo_id, files, main, dev)
