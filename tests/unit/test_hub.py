"""`--model org/name[@revision]` through huggingface_hub's real cache logic, offline, against a Hub
cache built in the Hub's own layout (blobs, refs, snapshots of symlinks): which snapshot each spec
names, the one-line errors, and that the sharded snapshot loads as its plain directory does."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common import cli, hub
from common.model_files import ModelNotFound, resolve
from common.serve import resolve_models
from common.settings import ServedModelsSettings
from tests.support.hub_cache import add_snapshot, repo_dir


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("spec, expected", [
    ("org/name", hub.HubRef("org/name", "main")),
    ("org/name@v1.0", hub.HubRef("org/name", "v1.0")),
    ("HuggingFaceTB/SmolLM2-135M-Instruct@refs/pr/1", hub.HubRef("HuggingFaceTB/SmolLM2-135M-Instruct", "refs/pr/1")),
    ("org/name@", None), ("smollm2", None), ("./org/name", None), ("/abs/dir", None), ("a/b/c", None),
    ("~/models", None), ("org/", None),
])
def test_what_is_shaped_like_a_hub_id(spec: str, expected: hub.HubRef | None) -> None:
    assert hub.parse(spec) == expected


def test_the_cache_and_offline_mode_come_from_huggingface_hubs_variables() -> None:
    env = hub.HubEnv.from_environ
    assert env({}).cache_dir == Path("~/.cache/huggingface/hub").expanduser()
    assert env({"XDG_CACHE_HOME": "/x"}) == hub.HubEnv(Path("/x/huggingface/hub"), False)
    assert env({"XDG_CACHE_HOME": "/x", "HF_HOME": "/home"}).cache_dir == Path("/home/hub")
    assert env({"HF_HOME": "/home", "HUGGINGFACE_HUB_CACHE": "/legacy"}).cache_dir == Path("/legacy")
    assert env({"HUGGINGFACE_HUB_CACHE": "/legacy", "HF_HUB_CACHE": "/c"}).cache_dir == Path("/c")
    assert [env({"HF_HUB_OFFLINE": v}).offline for v in ("1", "true", "ON", "0", "", "no")] == [True] * 3 + [False] * 3
    assert env({"TRANSFORMERS_OFFLINE": "1"}).offline


def test_org_name_is_the_snapshot_refs_main_names(offline_hub) -> None:
    source = resolve(offline_hub.repo_id)
    assert source.path == offline_hub.snapshot(offline_hub.main) and not source.is_gguf
    assert source.model_id == offline_hub.repo_id  # the queue tgq:<org/name>, whatever the revision
    assert sorted(p.name for p in source.path.glob("*.safetensors")) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert (source.path / "config.json").is_symlink()  # the cache's own files, not copies


def test_a_commit_and_a_branch_name_their_snapshots(offline_hub) -> None:
    assert offline_hub.main != offline_hub.dev
    at_commit = resolve(f"{offline_hub.repo_id}@{offline_hub.dev}")
    at_branch = resolve(f"{offline_hub.repo_id}@dev")  # refs/dev
    assert at_commit.path == at_branch.path == offline_hub.snapshot(offline_hub.dev)
    assert resolve(f"{offline_hub.repo_id}@main").path == offline_hub.snapshot(offline_hub.main)
    assert at_branch.model_id == offline_hub.repo_id


def test_model_id_overrides_the_derived_id(offline_hub) -> None:
    assert resolve(offline_hub.repo_id, "tiny").model_id == "tiny"


def test_a_model_missing_from_the_cache_is_one_line_naming_it_and_the_fix(offline_hub) -> None:
    with pytest.raises(ModelNotFound) as exc:
        resolve("tgq-tests/absent")
    text = one_line(exc)
    for part in ("tgq-tests/absent", "revision 'main'", str(offline_hub.cache), "HF_HUB_OFFLINE",
                 "hf download tgq-tests/absent"):
        assert part in text, text


def test_a_revision_missing_from_the_cache_is_one_line_naming_it(offline_hub) -> None:
    with pytest.raises(ModelNotFound) as exc:
        resolve(f"{offline_hub.repo_id}@v9")
    text = one_line(exc)
    for part in (f"revision 'v9' of {offline_hub.repo_id}", str(offline_hub.cache),
                 f"hf download {offline_hub.repo_id} --revision v9", "unset HF_HUB_OFFLINE"):
        assert part in text, text
    with pytest.raises(ModelNotFound, match="revision 'a{40}'"):
        resolve(f"{offline_hub.repo_id}@{'a' * 40}")


def test_an_id_the_hub_refuses_is_one_line(offline_hub) -> None:
    with pytest.raises(ModelNotFound, match="not a valid Hugging Face Hub id") as exc:
        resolve("org/bad--name")
    one_line(exc)


def test_missing_weights_fail_a_worker_but_not_the_api(offline_hub, tmp_path: Path) -> None:
    tokenizer_only = tmp_path / "tokenizer-only"
    tokenizer_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(offline_hub.files / name, tokenizer_only / name)
    add_snapshot(offline_hub.cache, "tgq-tests/no-weights", tokenizer_only)
    assert resolve("tgq-tests/no-weights", weights=False).path.is_dir()
    with pytest.raises(ModelNotFound, match=r"lacks its weights \(\*\.safetensors\)") as exc:
        resolve("tgq-tests/no-weights")
    assert "hf download tgq-tests/no-weights" in one_line(exc)

    shard_lost = tmp_path / "shard-lost"
    shutil.copytree(offline_hub.files, shard_lost)
    (shard_lost / "model-00002-of-00003.safetensors").unlink()
    add_snapshot(offline_hub.cache, "tgq-tests/shard-lost", shard_lost)
    with pytest.raises(ModelNotFound, match="lacks its weights .model-00002-of-00003.safetensors."):
        resolve("tgq-tests/shard-lost")


def test_a_snapshot_its_cached_tree_listing_shows_incomplete_is_one_line(offline_hub, tmp_path: Path) -> None:
    tree_cache = pytest.importorskip("huggingface_hub._tree_cache")  # the listing huggingface_hub caches per commit
    files = tmp_path / "partial"
    files.mkdir()
    shutil.copy(offline_hub.files / "config.json", files / "config.json")
    commit = add_snapshot(offline_hub.cache, "tgq-tests/partial", files)
    listing = {name: tree_cache.TreeCacheEntry(size=1, blob_id="0" * 40) for name in ("config.json", "tokenizer.json")}
    tree_cache.write_tree_cache(str(repo_dir(offline_hub.cache, "tgq-tests/partial")), commit, listing)
    with pytest.raises(ModelNotFound, match="holds tgq-tests/partial@main only in part") as exc:
        resolve("tgq-tests/partial", weights=False)
    assert "hf download tgq-tests/partial" in one_line(exc)


def test_a_hub_model_without_config_is_refused(offline_hub, tmp_path: Path) -> None:
    files = tmp_path / "gguf-repo"
    files.mkdir()
    (files / "tokenizer.json").write_text("{}")
    add_snapshot(offline_hub.cache, "tgq-tests/gguf-only", files)
    with pytest.raises(ModelNotFound, match="has no config.json") as exc:
        resolve("tgq-tests/gguf-only", weights=False)
    one_line(exc)


def test_an_existing_local_path_wins_over_a_hub_id(offline_hub, tmp_path: Path, monkeypatch) -> None:
    org, _, name = offline_hub.repo_id.partition("/")
    local = tmp_path / org / name
    shutil.copytree(offline_hub.files, local)
    (tmp_path / org / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    source = resolve(offline_hub.repo_id)
    assert source.path == local.resolve() and source.model_id == name
    gguf = resolve(f"{org}/model.gguf")
    assert gguf.is_gguf and gguf.path == (tmp_path / org / "model.gguf").resolve()
    (local / "config.json").unlink()
    with pytest.raises(ModelNotFound, match="a directory without config.json"):
        resolve(offline_hub.repo_id)


def test_smollm2_keeps_its_meaning(offline_hub) -> None:
    source = resolve("smollm2")
    assert source.is_gguf and source.model_id == "smollm2" and source.path.suffix == ".gguf"


@pytest.mark.parametrize("spec, message", [("/no/such/dir", "is not 'smollm2', an existing"),
                                           ("a/b/c", "is not 'smollm2', an existing")])
def test_a_missing_path_is_one_line(offline_hub, spec: str, message: str) -> None:
    with pytest.raises(ModelNotFound, match=message) as exc:
        resolve(spec)
    one_line(exc)


def test_the_worker_loads_the_sharded_snapshot_as_the_directory_itself(offline_hub) -> None:
    import torch

    from worker.model import load_model

    source = resolve(offline_hub.repo_id)
    assert json.loads((source.path / "model.safetensors.index.json").read_text())["weight_map"]
    from_hub = load_model(source, "", "cpu", "fp32", 1, fused=False)
    direct = load_model(resolve(str(offline_hub.files)), "", "cpu", "fp32", 1, fused=False)
    ids = torch.tensor([direct.tokenizer.encode("The capital of France is")])
    with torch.inference_mode():
        hub_logits, direct_logits = from_hub.model(ids).logits, direct.model(ids).logits
    assert from_hub.model_id == offline_hub.repo_id
    assert torch.equal(hub_logits, direct_logits)
    assert from_hub.tokenizer.encode("hello world") == direct.tokenizer.encode("hello world")


def test_serve_resolves_each_model_once_and_hands_the_children_its_directory_and_id(offline_hub) -> None:
    specs = (offline_hub.repo_id, f"{offline_hub.repo_id}@dev", "smollm2")
    resolved = resolve_models(ServedModelsSettings(model=specs, model_id=("", "tiny-dev")))
    assert resolved.model == (str(offline_hub.snapshot(offline_hub.main)), str(offline_hub.snapshot(offline_hub.dev)),
                              "smollm2")  # a GGUF keeps its spec: its conversion cache is keyed by its path
    assert resolved.model_id == (offline_hub.repo_id, "tiny-dev", "smollm2")
    assert [resolve(m.model, m.model_id).model_id for m in resolved.entries()] == list(resolved.model_id)


def test_serve_with_a_missing_model_is_one_error_line_and_starts_nothing(offline_hub, capsys) -> None:
    assert cli.main(["serve", "--model", "tgq-tests/absent", "--redis-url", "redis://127.0.0.1:1/0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("tgq: error: --model 'tgq-tests/absent'"), err


def test_serve_refuses_two_models_with_one_id_before_starting_anything(offline_hub, capsys) -> None:
    argv = ["serve", "--model", offline_hub.repo_id, "--model", f"{offline_hub.repo_id}@dev"]
    assert cli.main(argv) == 2
    assert "give each its own --model-id" in capsys.readouterr().err
