"""An API serving `--model org/name` from a hand-built Hub cache, offline: the id is the repo id and the
chat template is the one in the snapshot's tokenizer_config.json (no chat_template.jinja there)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tests.support.hub_cache import add_snapshot, repo_dir, template_into_config

REPO = "tgq-tests/chat-tokenizer"
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} .{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


def test_the_chat_template_comes_from_the_snapshots_tokenizer_config(make_harness: Any, model_dir: Path,
                                                                     tmp_path: Path, monkeypatch: Any) -> None:
    files = tmp_path / "files"  # what the API needs of a Hub repo: no weights
    files.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(model_dir / name, files / name)
    template_into_config(files, TEMPLATE)
    commit = add_snapshot(tmp_path / "hub", REPO, files)
    snapshot = repo_dir(tmp_path / "hub", REPO) / "snapshots" / commit
    assert json.loads((snapshot / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    assert not (snapshot / "chat_template.jinja").exists()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    h = make_harness(models=(REPO,))
    assert h.model_id == REPO
    resp = h.client.post("/chat_tokenize", content_type="application/json", data=json.dumps(
        {"model": REPO, "messages": [{"role": "user", "content": "hello world"}]}))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["templated_text"] == "[user] hello world .[assistant]"
    assert h.client.get("/v1/models").get_json()["data"][0]["id"] == REPO
