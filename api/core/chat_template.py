"""The model's chat template, rendered as transformers' `apply_chat_template(..., tokenize=False)` does.

Same engine and setup (jinja2's immutable sandbox, `trim_blocks`, `lstrip_blocks`, the loop controls,
the `raise_exception` and `strftime_now` globals, transformers' `tojson`), so the same template and
messages give the same text. TGI's rules on top: content parts are joined into one string, and a
final assistant message is continued instead of answered. transformers itself is not imported: the
API process stays light.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
# Appended to the message being continued to find where its content ends in the rendered text.
# transformers' own marker, so that a template that inspects the content sees the same string.
CONTINUE_MARKER = "CONTINUE_FINAL_MESSAGE_TAG "
# What a template can raise while rendering client messages: a request error, never a server one.
RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError, RecursionError)


class TemplateError(ValueError):
    """The template cannot render these messages; the message is shown to the client."""


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the type itself."""

    __call__ = staticmethod(dict)
    fromkeys = staticmethod(dict.fromkeys)


class _Namespace(Namespace):
    """jinja's namespace, refusing underscore names (`__html__` and the like are looked up on it)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # no named `self`: `namespace(self=1)` stays valid
        attrs = dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        Namespace.__init__(args[0], attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        super().__setitem__(name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace cannot hold the attribute {name!r}")


class _Generation(Extension):
    """`{% generation %}…{% endgeneration %}` marks assistant text for training masks; its body renders as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_Namespace)
    return env


def _compile(source: str) -> jinja2.Template:
    return _environment().from_string(source)


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _default_template(value: Any) -> str | None:
    """tokenizer_config.json's `chat_template`: a string, or a list of named templates."""
    if isinstance(value, list):
        return next((t["template"] for t in value if t.get("name") == "default"), None)
    return value


def _text(content: Any) -> Any:
    """TGI's rule: content parts become one string (images as markdown links), joined with nothing."""
    if not isinstance(content, list):
        return content
    parts = []
    for part in content:
        if part.get("type") == "text":
            parts.append(part["text"])
        elif part.get("type") == "image_url":
            parts.append(f"![]({part['image_url']['url']})")
        else:
            raise TemplateError(f"unsupported content part type {part.get('type')!r}")
    return "".join(parts)


def _cut_after_final(rendered: str, content: str) -> str:
    """The rendered text up to the end of the final message's content (marked by CONTINUE_MARKER)."""
    marker = CONTINUE_MARKER.strip()
    if marker not in rendered or content.strip() not in rendered:
        raise TemplateError("the chat template does not render the final assistant message, "
                            "so it cannot be continued")
    at = rendered.rindex(marker)
    # The template kept the marker's trailing space, so it kept the content's spacing too;
    # otherwise it trimmed the content, and so must we.
    return rendered[:at] if rendered.startswith(CONTINUE_MARKER, at) else rendered[:at].rstrip()


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str | None
    eos_token: str | None

    @classmethod
    def from_dir(cls, tokenizer_dir: Path) -> ChatTemplate | None:
        """The template a tokenizer directory ships (as transformers finds it); None when it has none."""
        config_path = Path(tokenizer_dir) / CONFIG_FILE
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        template_path = Path(tokenizer_dir) / TEMPLATE_FILE
        if template_path.is_file():
            source = template_path.read_text(encoding="utf-8")
        else:
            source = _default_template(config.get("chat_template"))
        if source is None:
            return None
        return cls(source, _token(config.get("bos_token")), _token(config.get("eos_token")))

    @cached_property
    def handles_tools(self) -> bool:
        """Whether the template reads `tools` (renders a tool list itself), as tool-calling models' do."""
        try:
            return "tools" in meta.find_undeclared_variables(_environment().parse(self.source))
        except jinja2.TemplateError:
            return False

    @cached_property
    def _template(self) -> jinja2.Template:
        try:
            return _compile(self.source)
        except jinja2.TemplateError as e:
            raise TemplateError(str(e)) from e

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The prompt for `messages`: a new assistant turn, or the continuation of a final assistant one.
        `tools` (OpenAI's tool list) is passed to the template as transformers passes it."""
        if not messages:
            raise TemplateError("the chat has no messages")
        # transformers drops None-valued keys: templates test for presence, not for None
        chat = [{k: _text(v) if k == "content" else v for k, v in m.items() if v is not None} for m in messages]
        final = chat[-1]
        continuing = final.get("role") == "assistant"
        content = final.get("content")
        if continuing and not isinstance(content, str):
            raise TemplateError("the final assistant message has no content to continue")
        if continuing:
            final["content"] = content + CONTINUE_MARKER
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        try:
            rendered = self._template.render(messages=chat, tools=tools, documents=None,
                                             add_generation_prompt=not continuing,
                                             **{k: v for k, v in tokens.items() if v is not None})
        except RENDER_ERRORS as e:
            raise TemplateError(str(e)) from e
        return _cut_after_final(rendered, content) if continuing else rendered
