"""A request's output constraint, whichever dialect named it.

TGI 3's `parameters.grammar` and huggingface_hub's `response_format` share one tagged shape,
`{"type": ..., "value": ...}`; OpenAI's `response_format` and tgq's `structured_outputs` map onto the
same kinds in `api.v1.requests`. Both dialects end here: `from_tagged` reads the tagged shape and
`grammar_of` checks a constraint and returns the llguidance grammar its jobs carry (common.grammars).
"""
from __future__ import annotations

import json
from typing import Any

from common.grammars import Constraint, ConstraintError

# TGI 3's variants (`json_object` is its alias of `json`), then tgq's: a Lark grammar and a choice.
TAGGED_TYPES = ("json", "json_object", "regex", "json_schema", "lark", "choice")


def from_tagged(kind: str, value: Any) -> Constraint:
    """`{"type": kind, "value": value}` as TGI 3 reads it: a JSON schema may come as an object or as
    JSON text; `json_schema`'s value is `{"name"?, "schema"}`."""
    if kind in ("json", "json_object"):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ConstraintError(f"the JSON schema is not valid JSON: {exc}") from None
        return Constraint("json", value)
    if kind == "json_schema":
        if not isinstance(value, dict) or "schema" not in value:
            raise ConstraintError("a `json_schema` value must be an object with a `schema`")
        return Constraint("json", value["schema"])
    if kind in ("regex", "lark", "choice"):
        return Constraint(kind, value)
    raise ConstraintError(f"unknown grammar type `{kind}`; expected one of {', '.join(TAGGED_TYPES)}")


def grammar_of(constraint: Constraint | None) -> str | None:
    """The llguidance grammar for the jobs (None: unconstrained); ConstraintError when it cannot be followed."""
    return None if constraint is None else constraint.grammar()
