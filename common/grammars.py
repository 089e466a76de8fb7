"""Output constraints: what a request may ask its output to follow, as one llguidance grammar.

Both dialects reduce their fields to a `Constraint` (TGI's `parameters.grammar`; OpenAI's
`response_format`, tgq's `choice` and `grammar`); `Constraint.grammar()` checks it and returns the
llguidance grammar text that the job carries to the worker (`worker/constraints.py`), which compiles
each distinct text once. Kinds:
- `json`: a JSON Schema (`true` or `{}` for any JSON value, `{"type": "object"}` for any object);
- `regex`: a regular expression the whole output matches (Rust regex syntax, as llguidance reads it);
- `lark`: a context-free grammar in llguidance's Lark dialect (`start:` is the output);
- `choice`: exactly one of a list of strings.
JSON is written without free whitespace (", " and ": " as separators), so a small model cannot spend
its tokens on blank lines.

Bounds (a 422/400 beyond them): the constraint's text is at most MAX_BYTES; llguidance's parser limits
(`parser_limits`) bound the lexer's and parser's work at compile time and per token, and a grammar
that exceeds them in the worker fails its job with a clear error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from llguidance import LLMatcher, LLParserLimits

KINDS = ("json", "regex", "lark", "choice")
MAX_BYTES = 64 * 1024
MAX_CHOICES = 1024
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def parser_limits() -> LLParserLimits:
    """llguidance's limits, a tenth of its defaults for the lexer's fuel: a grammar that needs more is
    refused rather than allowed to stall a worker's step."""
    return LLParserLimits(initial_lexer_fuel=200_000, step_lexer_fuel=100_000, step_max_items=20_000,
                          max_lexer_states=50_000, max_grammar_size=100_000, verbose_errors=False)


class ConstraintError(ValueError):
    """Why a constraint cannot be followed (the dialect words the error: 422 on TGI's routes, 400 on /v1)."""


@dataclass(frozen=True)
class Constraint:
    kind: str
    value: Any  # a schema (dict or bool), a pattern or grammar (str), or the choices (list of str)

    def grammar(self) -> str:
        """The llguidance grammar text for this constraint; ConstraintError when it is not a valid one."""
        return _grammar(self.kind, json.dumps(self.value))  # key order kept: it is the output order


@lru_cache(maxsize=256)
def _grammar(kind: str, value_json: str) -> str:
    if len(value_json.encode()) > MAX_BYTES:
        raise ConstraintError(f"the {kind} constraint is {len(value_json.encode())} bytes long; "
                              f"at most {MAX_BYTES} are accepted")
    value = json.loads(value_json)
    if kind == "json":
        try:
            grammar = LLMatcher.grammar_from_json_schema(_schema(value), defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise ConstraintError(f"invalid JSON schema: {exc}") from None
    elif kind == "regex":
        grammar = LLMatcher.grammar_from_regex(_text(value, "regex"))
    elif kind == "lark":
        grammar = LLMatcher.grammar_from_lark(_text(value, "grammar"))
    elif kind == "choice":
        # the strings themselves, not \u escapes: Lark reads each escape alone, so a surrogate pair
        # written as two escapes would not be the character
        grammar = LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                    for c in _choices(value)))
    else:
        raise ConstraintError(f"unknown constraint type `{kind}`; expected one of {', '.join(KINDS)}")
    error = LLMatcher.validate_grammar(grammar, None, limits=parser_limits())
    if error:
        raise ConstraintError(f"invalid {kind} constraint: {error.strip()}")
    return grammar


def _schema(value: Any) -> dict[str, Any]:
    from jsonschema import exceptions, validators

    if value is True:
        return {}
    if value is False:
        raise ConstraintError("the JSON schema `false` accepts no output")
    if not isinstance(value, dict):
        raise ConstraintError("a JSON schema must be an object or a boolean")
    try:
        validators.validator_for(value).check_schema(value)
    except exceptions.SchemaError as exc:
        raise ConstraintError(f"invalid JSON schema: {exc.message}") from None
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConstraintError(f"a {what} must be a non-empty string")
    return value


def _choices(value: Any) -> list[str]:
    if (not isinstance(value, list) or not value or len(value) > MAX_CHOICES
            or not all(isinstance(c, str) and c for c in value)):
        raise ConstraintError(f"`choice` must be a list of 1 to {MAX_CHOICES} non-empty strings")
    return value
