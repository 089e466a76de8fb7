"""Tool calls on /v1/chat/completions: the request's `tools`, `tool_choice` and `parallel_tool_calls`,
what the model is shown, the grammar its answer follows, and the calls read back out of the answer.

**One call format for every model.** A call is answered as JSON of one shape, whatever the model's
family (llama.cpp calls its fallback for templates it does not know the "generic" format):

    {"tool_calls": [{"name": "<function>", "arguments": {...}}, ...]}

and the output is constrained to it (`api.core.constraints`, compiled by llguidance in the worker):
- `required`: the answer is that JSON, with one or more calls of the offered functions, each one's
  `arguments` valid under its `parameters` schema: at most as many calls as functions are offered
  (a small model repeats a call until `max_tokens` otherwise: SmolLM2 at temperature 0 did), one
  when `parallel_tool_calls` is false;
- a named function: exactly one call of that function;
- `auto` (the default with tools): a grammar with two branches, free text that does not start with
  `{`, or the call JSON; the model's first token picks the branch;
- `none`: no constraint, and the tools are not shown.

**What the model is shown.** A template that reads `tools` renders them itself (transformers'
`apply_chat_template(..., tools=...)`), with earlier assistant `tool_calls` (their `arguments` given
to the template as objects, as transformers expects) and `role: "tool"` messages as the client sent
them. A template that does not (SmolLM2's) gets the tools in a system message that says how to call
them (`GENERIC_PROMPT`), and earlier calls written back in the call format above.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from common.grammars import JSON_OPTIONS, Constraint

from .errors import InvalidRequest

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
CHOICES = ("none", "auto", "required")
GENERIC_PROMPT = (
    "You can call functions. To call one or more, answer with JSON only, in exactly this form:\n"
    '{"tool_calls": [{"name": "<function name>", "arguments": {<the arguments>}}]}\n'
    "<rule>The functions, as JSON schemas:\n<functions>")
RULES = {"auto": "Otherwise, answer in plain text.\n", "required": "You must call at least one function.\n"}


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["parameters"] = self.parameters
        return out


@dataclass(frozen=True)
class Tools:
    """A chat request's tools and how the model may use them."""
    functions: tuple[Function, ...]
    choice: str  # none | auto | required | function (then `named`)
    named: str | None = None
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Whether the answer may hold calls (the model is shown the tools and its output constrained)."""
        return self.choice != "none"

    def constraint(self) -> Constraint | None:
        if not self.active:
            return None
        offered = [f for f in self.functions if self.named in (None, f.name)]
        calls = {"type": "array", "items": {"anyOf": [_call_schema(f) for f in offered]}, "minItems": 1}
        calls["maxItems"] = len(offered) if self.parallel and self.named is None else 1
        envelope = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
                    "additionalProperties": False}
        if self.choice != "auto":
            return Constraint("json", envelope)
        return Constraint("lark", "start: TEXT | call\nTEXT: /[^{](.|\\n)*/\ncall: %json "
                          + json.dumps({**envelope, "x-guidance": JSON_OPTIONS}))

    def prompt(self, messages: list[dict[str, Any]], template_handles_tools: bool
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The messages and the `tools` argument the template renders."""
        if template_handles_tools:
            shown = [{"type": "function", "function": f.spec()} for f in self.functions] if self.active else None
            return [_native_history(m) for m in messages], shown
        history = [_generic_history(m) for m in messages]
        if not self.active:
            return history, None
        rule = f"You must call the function `{self.named}`.\n" if self.named else RULES.get(self.choice, "")
        text = GENERIC_PROMPT.replace("<rule>", rule).replace(
            "<functions>", "\n".join(json.dumps(f.spec()) for f in self.functions))
        if history and history[0].get("role") == "system" and isinstance(history[0].get("content"), str):
            return [{**history[0], "content": history[0]["content"] + "\n\n" + text}, *history[1:]], None
        return [{"role": "system", "content": text}, *history], None


def _call_schema(f: Function) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": f.name}, "arguments": f.parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def _arguments(value: Any) -> Any:
    """An earlier call's `arguments` as an object where the client sent OpenAI's JSON string."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _native_history(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    fixed = [{**c, "function": {**c["function"], "arguments": _arguments(c["function"].get("arguments"))}}
             if isinstance(c, dict) and isinstance(c.get("function"), dict) else c for c in calls]
    return {**message, "tool_calls": fixed}


def _generic_history(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if message.get("role") != "assistant" or not isinstance(calls, list):
        return message
    written = [{"name": c["function"].get("name"), "arguments": _arguments(c["function"].get("arguments"))}
               for c in calls if isinstance(c, dict) and isinstance(c.get("function"), dict)]
    rest = {k: v for k, v in message.items() if k != "tool_calls"}
    return {**rest, "content": json.dumps({"tool_calls": written})}


def read_tools(body: dict[str, Any]) -> Tools | None:
    """The request's tools (None when it has none); InvalidRequest naming the field otherwise."""
    given, choice = body.get("tools"), body.get("tool_choice")
    if given is None:
        if choice not in (None, "none"):
            raise InvalidRequest("`tool_choice` needs `tools`", "tool_choice")
        return None
    if not isinstance(given, list):
        raise InvalidRequest("`tools` must be a list of tools", "tools")
    functions = tuple(_function(tool, i) for i, tool in enumerate(given))
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise InvalidRequest("`tools` names a function twice", "tools")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise InvalidRequest("`parallel_tool_calls` must be a boolean", "parallel_tool_calls")
    if choice is None:
        return Tools(functions, "auto" if functions else "none", parallel=parallel)
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise InvalidRequest(f"`tool_choice` must be one of {', '.join(CHOICES)} or a function. Given: {choice}",
                                 "tool_choice")
        if choice != "none" and not functions:
            raise InvalidRequest("`tool_choice` needs at least one tool", "tool_choice")
        return Tools(functions, choice, parallel=parallel)
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(named, str):
        raise InvalidRequest('`tool_choice` must be a string or {"type": "function", "function": {"name": ...}}',
                             "tool_choice")
    if named not in names:
        raise InvalidRequest(f"`tool_choice` names the function `{named}`, which `tools` does not offer", "tool_choice")
    return Tools(functions, "function", named=named, parallel=parallel)


def _function(tool: Any, i: int) -> Function:
    param = f"tools[{i}]"
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
        raise InvalidRequest(f'`{param}` must be {{"type": "function", "function": {{...}}}}', param)
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidRequest(f"`{param}.function.name` must be 1 to 64 of a-z, A-Z, 0-9, _ and -", param)
    description = fn.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidRequest(f"`{param}.function.description` must be a string", param)
    parameters = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise InvalidRequest(f"`{param}.function.parameters` must be a JSON schema object", param)
    return Function(name, description, parameters)


def calls_in(text: str) -> list[dict[str, Any]] | None:
    """The answer's calls in OpenAI's shape (None when the answer is text, or an unfinished call)."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        return None
    calls = parsed.get("tool_calls") if isinstance(parsed, dict) else None
    if not isinstance(calls, list) or not calls:
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c.get("name"), "arguments": json.dumps(c.get("arguments", {}))}}
            for c in calls if isinstance(c, dict)]
