"""Request bodies to typed requests, rejecting like TGI 0.5.0's axum `Json` extractor.

These rejections are plain text, not TGI's JSON error envelope:
  415  Expected request with `Content-Type: application/json`
  400  Failed to parse the request body as JSON: <serde_json syntax error>
  422  Failed to deserialize the JSON body into the target type: <path>: <serde error>
The typed walk below follows serde's derive rules for TGI's structs: fields in document order,
unknown fields ignored, `null` only for `Option` fields, duplicate known fields refused, and a
struct may also be given as a JSON array of its fields in declaration order.
No Flask import: this module is pure.
"""
from __future__ import annotations

import struct
from decimal import Decimal
from typing import Any, Callable

from ..core.constraints import TAGGED_TYPES
from ..core.request import RawParameters, RawRequest
from ..core.validation import ValidRequest, Validator, check_best_of
from .jsontext import JsonSyntaxError, Node, parse, position

JSON_CONTENT_TYPE_MSG = "Expected request with `Content-Type: application/json`"
SYNTAX_PREFIX = "Failed to parse the request body as JSON: "
DATA_PREFIX = "Failed to deserialize the JSON body into the target type: "

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1


class Rejection(Exception):
    """A body the extractor refuses; answered as text/plain with `status`."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def is_json_content_type(value: str | None) -> bool:
    """axum 0.6: `application/json` or `application/<anything>+json`, parameters ignored."""
    if not value:
        return False
    mime = value.split(";", 1)[0].strip().lower()
    kind, _, subtype = mime.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def parse_request(body: bytes, content_type: str | None, *, compat: bool = False) -> RawRequest:
    """Bytes + Content-Type header to a RawRequest, or raise Rejection (415/400/422)."""
    if not is_json_content_type(content_type):
        raise Rejection(415, JSON_CONTENT_TYPE_MSG)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        prefix = body[:exc.start].decode("utf-8")
        line, column = position(prefix, len(prefix))
        raise Rejection(400, f"{SYNTAX_PREFIX}invalid unicode code point at line {line} column {column}") from None
    try:
        root = parse(text)
    except JsonSyntaxError as exc:
        raise Rejection(400, SYNTAX_PREFIX + str(exc)) from None
    try:
        return _Walker(text).request(root, compat)
    except _DataError as exc:
        raise Rejection(422, DATA_PREFIX + exc.render()) from None


# --- serde-style messages -------------------------------------------------------------------

def rust_float(x: float) -> str:
    """Rust's `Display` for f64: shortest round-trip digits, never an exponent."""
    text = format(Decimal(repr(x)), "f")
    return text


def _debug_str(s: str) -> str:
    """Rust's `{:?}` for a str, close enough for error messages."""
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\0":
            out.append("\\0")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _unexpected(node: Node) -> str:
    if node.kind == "str":
        return f"string {_debug_str(node.value)}"
    if node.kind in ("u", "i"):
        return f"integer `{node.value}`"
    if node.kind == "f":
        text = rust_float(node.value)
        return f"floating point `{text if '.' in text else text + '.0'}`"
    if node.kind == "bool":
        return f"boolean `{'true' if node.value else 'false'}`"
    if node.kind == "null":
        return "null"
    return "sequence" if node.kind == "arr" else "map"


class _DataError(Exception):
    def __init__(self, message: str, text: str, index: int, path: list[str | int]) -> None:
        super().__init__(message)
        self.message = message
        self.line, self.column = position(text, index)
        self.path = path

    def render(self) -> str:
        # serde_path_to_error prints no path for errors at the root.
        prefix = ""
        if self.path:
            parts: list[str] = []
            for seg in self.path:
                if isinstance(seg, int):
                    parts.append(f"[{seg}]")
                else:
                    parts.append(("." if parts else "") + seg)
            prefix = "".join(parts) + ": "
        return f"{prefix}{self.message} at line {self.line} column {self.column}"


def _to_f32(x: float) -> float:
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return float("inf") if x > 0 else float("-inf")


class _Walker:
    def __init__(self, text: str) -> None:
        self.text = text

    def error(self, message: str, index: int, path: list[str | int]) -> _DataError:
        return _DataError(message, self.text, index, path)

    def invalid_type(self, node: Node, expected: str, path: list[str | int]) -> _DataError:
        # serde_json consumes scalars before complaining; it only peeks at `[` and `{`.
        index = node.start if node.kind in ("arr", "obj") else node.end
        return self.error(f"invalid type: {_unexpected(node)}, expected {expected}", index, path)

    # scalar readers --------------------------------------------------------------------------

    def unsigned(self, node: Node, path: list[str | int], name: str, limit: int) -> int:
        if node.kind == "u" and node.value <= limit:
            return int(node.value)
        if node.kind in ("u", "i"):
            raise self.error(f"invalid value: integer `{node.value}`, expected {name}", node.end, path)
        raise self.invalid_type(node, name, path)

    def i32(self, node: Node, path: list[str | int]) -> int:
        if node.kind in ("u", "i"):
            if I32_MIN <= node.value <= I32_MAX:
                return int(node.value)
            raise self.error(f"invalid value: integer `{node.value}`, expected i32", node.end, path)
        raise self.invalid_type(node, "i32", path)

    def f32(self, node: Node, path: list[str | int]) -> float:
        if node.kind in ("u", "i", "f"):
            return _to_f32(float(node.value))
        raise self.invalid_type(node, "f32", path)

    def boolean(self, node: Node, path: list[str | int]) -> bool:
        if node.kind == "bool":
            return bool(node.value)
        raise self.invalid_type(node, "a boolean", path)

    def string(self, node: Node, path: list[str | int]) -> str:
        if node.kind == "str":
            return str(node.value)
        raise self.invalid_type(node, "a string", path)

    def strings(self, node: Node, path: list[str | int]) -> tuple[str, ...]:
        if node.kind != "arr":
            raise self.invalid_type(node, "a sequence", path)
        return tuple(self.string(item, path + [i]) for i, item in enumerate(node.value))

    def optional(self, read: Callable[[Node, list[str | int]], Any]) -> Callable[[Node, list[str | int]], Any]:
        def read_opt(node: Node, path: list[str | int]) -> Any:
            return None if node.kind == "null" else read(node, path)
        return read_opt

    # structs ---------------------------------------------------------------------------------

    def struct(self, node: Node, path: list[str | int], name: str,
               fields: list[tuple[str, Callable[[Node, list[str | int]], Any]]],
               required: tuple[str, ...]) -> dict[str, Any]:
        """serde derive's visit_map / visit_seq for a struct whose other fields have defaults."""
        out: dict[str, Any] = {}
        if node.kind == "obj":
            readers = dict(fields)
            for key, key_end, value in node.value:
                read = readers.get(key)
                if read is None:
                    continue  # unknown fields are ignored (no deny_unknown_fields)
                if key in out:
                    raise self.error(f"duplicate field `{key}`", key_end, path)
                out[key] = read(value, path + [key])
            for key in required:
                if key not in out:
                    raise self.error(f"missing field `{key}`", node.end, path)
            return out
        if node.kind == "arr":
            items = node.value
            for i, (key, read) in enumerate(fields):
                if i >= len(items):
                    if key in required:
                        raise self.error(f"invalid length {i}, expected struct {name} with {len(fields)} elements",
                                         node.end, path)
                    break
                out[key] = read(items[i], path + [i])
            if len(items) > len(fields):
                extra = items[len(fields)]
                # serde_json's end_seq sees a `,` where `]` should be: a syntax-category error.
                raise Rejection(400, SYNTAX_PREFIX + str(JsonSyntaxError("trailing characters", self.text,
                                                                        extra.start + 1)))
            return out
        raise self.invalid_type(node, f"struct {name}", path)

    def grammar(self, node: Node, path: list[str | int]) -> tuple[str, Any]:
        """TGI 3's `GrammarType`, serde's adjacently tagged enum: `{"type": <variant>, "value": ...}`."""
        if node.kind != "obj":
            raise self.invalid_type(node, "adjacently tagged enum GrammarType", path)
        fields: dict[str, tuple[int, Node]] = {}
        for key, key_end, value in node.value:
            if key in ("type", "value"):
                if key in fields:
                    raise self.error(f"duplicate field `{key}`", key_end, path)
                fields[key] = (key_end, value)
        if "type" not in fields:
            raise self.error("missing field `type`", node.end, path)
        kind = fields["type"][1]
        if kind.kind != "str":
            raise self.invalid_type(kind, "variant identifier", path + ["type"])
        if kind.value not in TAGGED_TYPES:
            expected = ", ".join(f"`{t}`" for t in TAGGED_TYPES)
            raise self.error(f"unknown variant `{kind.value}`, expected one of {expected}", kind.end, path + ["type"])
        if "value" not in fields:
            raise self.error("missing field `value`", node.end, path)
        return str(kind.value), plain(fields["value"][1])

    def parameters(self, node: Node, path: list[str | int]) -> RawParameters:
        opt = self.optional
        fields: list[tuple[str, Callable[[Node, list[str | int]], Any]]] = [
            ("best_of", opt(lambda n, p: self.unsigned(n, p, "usize", U64_MAX))),
            ("temperature", opt(self.f32)),
            ("repetition_penalty", opt(self.f32)),
            ("top_k", opt(self.i32)),
            ("top_p", opt(self.f32)),
            ("typical_p", opt(self.f32)),
            ("do_sample", self.boolean),
            ("max_new_tokens", lambda n, p: self.unsigned(n, p, "u32", U32_MAX)),
            ("return_full_text", opt(self.boolean)),
            ("stop", self.strings),
            ("truncate", opt(lambda n, p: self.unsigned(n, p, "usize", U64_MAX))),
            ("watermark", self.boolean),
            ("details", self.boolean),
            ("seed", opt(lambda n, p: self.unsigned(n, p, "u64", U64_MAX))),
            ("grammar", opt(self.grammar)),  # TGI 3's field
        ]
        return RawParameters(**self.struct(node, path, "GenerateParameters", fields, ()))

    def request(self, node: Node, compat: bool) -> RawRequest:
        fields: list[tuple[str, Callable[[Node, list[str | int]], Any]]] = [
            ("inputs", self.string), ("parameters", self.parameters)]
        if compat:
            fields.append(("stream", self.boolean))
        name = "CompatGenerateRequest" if compat else "GenerateRequest"
        return RawRequest(**self.struct(node, [], name, fields, ("inputs",)))


def plain(node: Node) -> Any:
    """A parsed JSON value as Python values (objects keep the last of duplicate keys, as serde_json's Value)."""
    if node.kind == "obj":
        return {key: plain(value) for key, _, value in node.value}
    if node.kind == "arr":
        return [plain(item) for item in node.value]
    return node.value


def parse_and_validate(body: bytes, content_type: str | None, validator: Validator, *,
                       compat: bool = False, stream: bool | None = None,
                       overloaded: Callable[[int], None] | None = None) -> ValidRequest:
    """Parse, handler-level best_of check, optional 429 hook, validate: the routes' order.

    `stream` None means "as the body says" (compat routes) or False.
    Raises parsing.Rejection, common.errors.ValidationError or whatever `overloaded` raises.
    """
    request = parse_request(body, content_type, compat=compat)
    is_stream = request.stream if stream is None else stream
    copies = check_best_of(request.parameters, validator.limits, stream=is_stream)
    if overloaded is not None:
        overloaded(copies)
    return validator.validate(request, best_of=copies)
