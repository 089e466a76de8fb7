"""Hugging Face Hub ids as `--model`: `org/name[@revision]` resolved to a snapshot directory of the Hub's cache.

With a network, huggingface_hub downloads the files tgq needs (configs, tokenizer files, chat
templates and, for a worker, the `*.safetensors` weights with their index) into its cache once; a
later start asks the Hub which commit the revision names and finds the files already there. With
`HF_HUB_OFFLINE=1` the cache alone answers. The snapshot directory is then used exactly like a local
model directory.

The cache and offline mode come from huggingface_hub's own variables (`HF_HUB_CACHE`, `HF_HOME`,
`HF_HUB_OFFLINE`), read when a model is resolved. huggingface_hub is imported only here, and only
when a Hub id is resolved.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

# What the API needs (tokenizer, chat template, limits from the config) ...
TOKENIZER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")
# ... and what a worker needs on top of it.
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json")
INDEX_FILE = "model.safetensors.index.json"

_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's spelling of a true variable
# org/name: huggingface_hub checks the finer rules (length, no `--`) when it is asked.
_REPO_ID = re.compile(r"[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*")


class HubError(ValueError):
    """A Hub id that cannot be resolved; the message is one line saying why and what to do."""


@dataclass(frozen=True)
class HubRef:
    repo_id: str  # org/name
    revision: str = "main"  # a branch, a tag or a commit hash

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}"

    def download_hint(self) -> str:
        extra = "" if self.revision == "main" else f" --revision {self.revision}"
        return f"hf download {self.repo_id}{extra}"


def parse(spec: str) -> HubRef | None:
    """`org/name` or `org/name@revision` as a HubRef; None when `spec` is not shaped like a Hub id."""
    repo_id, at, revision = spec.partition("@")
    if not _REPO_ID.fullmatch(repo_id) or (at and not revision.strip()):
        return None
    return HubRef(repo_id, revision.strip() or "main")


@dataclass(frozen=True)
class HubEnv:
    cache_dir: Path  # the Hub cache: models--org--name/{blobs,refs,snapshots}
    offline: bool  # HF_HUB_OFFLINE: the cache alone, no network

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> HubEnv:
        """huggingface_hub's variables, read now (its own module reads them once, at import)."""
        env = os.environ if environ is None else environ
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
        flag = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or ""
        return cls(Path(os.path.expandvars(os.path.expanduser(cache))), flag.strip().upper() in _TRUE)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _missing_offline(ref: HubRef, env: HubEnv) -> HubError:
    from huggingface_hub.file_download import repo_folder_name

    known = (env.cache_dir / repo_folder_name(repo_id=ref.repo_id, repo_type="model")).is_dir()
    what = (f"revision {ref.revision!r} of {ref.repo_id}" if known
            else f"model {ref.repo_id} (revision {ref.revision!r})")
    return HubError(f"the Hugging Face cache {env.cache_dir} has no {what}, and HF_HUB_OFFLINE is set: download it "
                    f"with `{ref.download_hint()}` (same HF_HUB_CACHE/HF_HOME), or unset HF_HUB_OFFLINE")


def _download(ref: HubRef, env: HubEnv, patterns: list[str]) -> Path:
    from huggingface_hub import errors, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # absent from older huggingface_hub
    try:
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=env.cache_dir,
                                      allow_patterns=patterns, local_files_only=env.offline))
    except HFValidationError as exc:
        raise HubError(f"{ref.repo_id!r} is not a valid Hugging Face Hub id: {_first_line(exc)}") from None
    except incomplete as exc:
        fix = "or unset HF_HUB_OFFLINE" if env.offline else "where the Hub is reachable"
        raise HubError(f"the Hugging Face cache {env.cache_dir} holds {ref} only in part: complete it with "
                       f"`{ref.download_hint()}` {fix} ({_first_line(exc)})") from None
    except LocalEntryNotFoundError as exc:
        if env.offline:
            raise _missing_offline(ref, env) from None
        raise HubError(f"the Hugging Face Hub could not be reached for {ref} and the cache {env.cache_dir} does not "
                       f"hold it: check the network (or HF_ENDPOINT), or download it where the Hub is reachable "
                       f"(`{ref.download_hint()}`) ({_first_line(exc)})") from None
    except GatedRepoError:
        raise HubError(f"{ref.repo_id} is gated on the Hugging Face Hub: accept its terms on its page, then log "
                       f"in (`hf auth login`) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubError(f"the Hugging Face Hub has no model {ref.repo_id} (or it is private: log in with "
                       f"`hf auth login` or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubError(f"the Hugging Face Hub model {ref.repo_id} has no revision {ref.revision!r}") from None
    except HfHubHTTPError as exc:
        raise HubError(f"downloading {ref} from the Hugging Face Hub failed: {_first_line(exc)}") from None
    except OSError as exc:  # the cache is not writable, the disk is full, ...
        raise HubError(f"downloading {ref} into the Hugging Face cache {env.cache_dir} failed: "
                       f"{_first_line(exc)}") from None


def _check_weights(ref: HubRef, snapshot: Path, env: HubEnv) -> None:
    """The snapshot has its safetensors weights: every shard its index lists, or one unsharded file."""
    index = snapshot / INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            raise HubError(f"{index} of {ref} is not a safetensors index ({_first_line(exc)})") from None
        missing = [name for name in shards if not (snapshot / name).is_file()]
    else:
        missing = [] if any(snapshot.glob("*.safetensors")) else ["*.safetensors"]
    if not missing:
        return
    fix = (f"download them with `{ref.download_hint()}`, or unset HF_HUB_OFFLINE" if env.offline
           else "tgq loads safetensors checkpoints only")
    raise HubError(f"the snapshot {snapshot} of {ref} lacks its weights ({', '.join(missing[:3])}): {fix}")


def snapshot(ref: HubRef, env: HubEnv, *, weights: bool = True) -> Path:
    """The snapshot directory of `ref` in the Hub's cache, downloading the files tgq needs unless offline.

    `weights`: also the `*.safetensors` weights (a worker); without, only what the API reads."""
    patterns = list(TOKENIZER_FILES) + (list(WEIGHT_FILES) if weights else [])
    path = _download(ref, env, patterns)
    if weights:
        _check_weights(ref, path, env)
    return path
