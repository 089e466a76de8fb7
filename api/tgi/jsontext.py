"""A small JSON reader that keeps positions, so rejections can say where, the way serde_json does.

TGI's router deserializes request bodies with serde_json; its error messages end in
`at line L column C`, where C counts *bytes* from the start of the line up to the point the
reader had reached. Python's `json` module has other messages and no positions for type errors,
so tgq reads the body with this reader (strings go through the C `scanstring`, so long prompts
stay cheap) and `api.tgi.parsing` walks the resulting nodes in document order.
"""
from __future__ import annotations

import json.decoder
import re
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 128  # serde_json's recursion limit
U64_MAX = 2**64 - 1
I64_MIN = -(2**63)

_WS = " \t\n\r"
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_scanstring = json.decoder.scanstring  # type: ignore[attr-defined]  # C implementation


class JsonSyntaxError(ValueError):
    """The body is not JSON (axum: 400 `Failed to parse the request body as JSON`)."""

    def __init__(self, message: str, text: str, index: int) -> None:
        line, column = position(text, index)
        super().__init__(f"{message} at line {line} column {column}")


@dataclass
class Node:
    """One JSON value. `kind`: obj, arr, str, u (u64), i (negative i64), f (f64), bool, null.

    `start` is the index of the value's first character, `end` the index just past it. For `obj`,
    `value` is a list of (key, index just past the key, Node); for `arr` a list of Nodes.
    """
    kind: str
    value: Any
    start: int
    end: int


def position(text: str, index: int) -> tuple[int, int]:
    """serde_json's (line, column) for a reader that has consumed `text[:index]` (column in bytes)."""
    index = max(0, min(index, len(text)))
    line = text.count("\n", 0, index) + 1
    line_start = text.rfind("\n", 0, index) + 1
    column = len(text[line_start:index].encode("utf-8", "surrogatepass"))
    return line, column


def parse(text: str) -> Node:
    """Parse a whole document; raises JsonSyntaxError with serde_json's wording."""
    reader = _Reader(text)
    node = reader.value(reader.skip_ws(0), MAX_DEPTH)
    rest = reader.skip_ws(node.end)
    if rest < len(text):
        raise JsonSyntaxError("trailing characters", text, rest + 1)
    return node


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.n = len(text)

    def skip_ws(self, i: int) -> int:
        text, n = self.text, self.n
        while i < n and text[i] in _WS:
            i += 1
        return i

    def fail(self, message: str, i: int) -> JsonSyntaxError:
        # serde_json reports syntax errors at the offending character (peek position, 1-based).
        return JsonSyntaxError(message, self.text, min(i + 1, self.n))

    def eof(self, message: str) -> JsonSyntaxError:
        return JsonSyntaxError(message, self.text, self.n)

    def value(self, i: int, depth: int) -> Node:
        if i >= self.n:
            raise self.eof("EOF while parsing a value")
        ch = self.text[i]
        if ch == '"':
            return self.string(i)
        if ch == "{":
            return self.obj(i, depth)
        if ch == "[":
            return self.arr(i, depth)
        if ch == "-" or "0" <= ch <= "9":
            return self.number(i)
        for word, kind, val in (("null", "null", None), ("true", "bool", True), ("false", "bool", False)):
            if ch == word[0]:
                return self.ident(i, word, kind, val)
        raise self.fail("expected value", i)

    def ident(self, i: int, word: str, kind: str, val: Any) -> Node:
        for k, expected in enumerate(word):
            j = i + k
            if j >= self.n:
                raise self.eof("EOF while parsing a value")
            if self.text[j] != expected:
                raise self.fail("expected ident", j)
        return Node(kind, val, i, i + len(word))

    def string(self, i: int) -> Node:
        try:
            s, end = _scanstring(self.text, i + 1, True)
        except json.JSONDecodeError as exc:
            msg = exc.msg
            if msg.startswith("Unterminated string"):
                raise self.eof("EOF while parsing a string") from None
            if msg.startswith("Invalid control character"):
                raise self.fail("control character (\\u0000-\\u001F) found while parsing a string",
                                exc.pos) from None
            raise self.fail("invalid escape", exc.pos) from None
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            # A `\ud800`-style escape without its pair: serde_json refuses it; so must we (orjson would).
            raise JsonSyntaxError("lone leading surrogate in hex escape", self.text, end) from None
        return Node("str", s, i, end)

    def number(self, i: int) -> Node:
        m = _NUMBER.match(self.text, i)
        if m is None:
            if i + 1 >= self.n:
                raise self.eof("EOF while parsing a value")
            raise self.fail("invalid number", i + 1)
        end = m.end()
        if end < self.n and self.text[end].isdigit():  # "01"
            raise self.fail("invalid number", end)
        if end < self.n and self.text[end] in ".eE":  # "1." or "1e"
            raise self.eof("EOF while parsing a value") if end + 1 >= self.n else self.fail("invalid number", end + 1)
        raw = m.group(0)
        if m.group(1) is None and m.group(2) is None:
            v = int(raw)
            if raw.startswith("-"):
                if v == 0:
                    return Node("f", -0.0, i, end)  # serde_json reads `-0` as the float -0.0
                if v >= I64_MIN:
                    return Node("i", v, i, end)
            elif v <= U64_MAX:
                return Node("u", v, i, end)
        f = float(raw)
        if f in (float("inf"), float("-inf")):
            raise JsonSyntaxError("number out of range", self.text, end)
        return Node("f", f, i, end)

    def obj(self, i: int, depth: int) -> Node:
        if depth == 0:
            raise self.fail("recursion limit exceeded", i)
        pairs: list[tuple[str, int, Node]] = []
        j = self.skip_ws(i + 1)
        if j < self.n and self.text[j] == "}":
            return Node("obj", pairs, i, j + 1)
        while True:
            if j >= self.n:
                raise self.eof("EOF while parsing an object")
            if self.text[j] != '"':
                raise self.fail("key must be a string", j)
            key = self.string(j)
            j = self.skip_ws(key.end)
            if j >= self.n:
                raise self.eof("EOF while parsing an object")
            if self.text[j] != ":":
                raise self.fail("expected `:`", j)
            val = self.value(self.skip_ws(j + 1), depth - 1)
            pairs.append((key.value, key.end, val))
            j = self.skip_ws(val.end)
            if j >= self.n:
                raise self.eof("EOF while parsing an object")
            if self.text[j] == "}":
                return Node("obj", pairs, i, j + 1)
            if self.text[j] != ",":
                raise self.fail("expected `,` or `}`", j)
            j = self.skip_ws(j + 1)
            if j < self.n and self.text[j] == "}":
                raise self.fail("trailing comma", j)

    def arr(self, i: int, depth: int) -> Node:
        if depth == 0:
            raise self.fail("recursion limit exceeded", i)
        items: list[Node] = []
        j = self.skip_ws(i + 1)
        if j < self.n and self.text[j] == "]":
            return Node("arr", items, i, j + 1)
        while True:
            if j >= self.n:
                raise self.eof("EOF while parsing a list")
            val = self.value(j, depth - 1)
            items.append(val)
            j = self.skip_ws(val.end)
            if j >= self.n:
                raise self.eof("EOF while parsing a list")
            if self.text[j] == "]":
                return Node("arr", items, i, j + 1)
            if self.text[j] != ",":
                raise self.fail("expected `,` or `]`", j)
            j = self.skip_ws(j + 1)
            if j < self.n and self.text[j] == "]":
                raise self.fail("trailing comma", j)
