"""OpenAI's published response schemas (a pinned subset, `openai_schemas.json`) as JSON Schema validators."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

PINNED = Path(__file__).with_name("openai_schemas.json")


def _or_null(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` as JSON Schema's "or null" (the document still mixes both styles)."""
    if isinstance(node, list):
        return [_or_null(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _or_null(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@lru_cache(maxsize=None)
def validator(name: str) -> Draft202012Validator:
    components = _or_null(json.loads(PINNED.read_text())["components"])
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": components})


def problems(name: str, body: dict[str, Any]) -> list[str]:
    """Every way `body` breaks OpenAI's `name` schema (empty: it conforms)."""
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(name).iter_errors(body)]
