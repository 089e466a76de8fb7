"""OpenAI request bodies (/v1/chat/completions, /v1/completions) read, checked and mapped onto
tgq's jobs with /generate's rules and limits, keeping OpenAI's meanings where they differ:
`temperature` 0 is greedy, `top_p` 1.0 is off, `n` is bounded by `--max-n`, and without
`max_tokens` a choice may use whatever fits in `--max-total-tokens` after its prompt (as TGI 3).

Unknown fields are ignored, as both OpenAI and TGI 3 do. No Flask here.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

from common.errors import ValidationError
from common.grammars import Constraint, ConstraintError
from common.schemas import SamplingParams

from ..core.constraints import from_tagged, grammar_of
from ..core.models import ServedModel
from ..core.request import RawParameters, RawRequest
from ..core.service import JobSpec
from ..core.validation import random_seed
from .answers import AnswerRules
from .errors import InvalidRequest
from .tools import Tools, read_tools

U64 = 2**64
MAX_TOP_LOGPROBS = 20
PENALTY_RANGE = (-2.0, 2.0)


@dataclass(frozen=True)
class Sampling:
    """The sampling fields both /v1 routes share, as given (None: not given)."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    n: int = 1
    top_logprobs: int | None = None  # None: no logprobs; 0..20 alternatives per token otherwise


@dataclass(frozen=True)
class V1Request:
    model: str | None
    prompts: list[str]  # one for chat (the rendered template), one per choice group for completions
    sampling: Sampling
    stream: bool
    include_usage: bool
    add_special_tokens: bool  # False for chat: the template writes its own special tokens
    messages: list[dict[str, Any]] | None = None  # chat only
    grammar: str | None = None  # response_format / structured_outputs as an llguidance grammar (api.core.constraints)
    tools: Tools | None = None  # chat only (api.v1.tools)


    @property
    def rules(self) -> AnswerRules:
        """How each choice's answer is shaped from the worker's text (stop cut, tool calls)."""
        return AnswerRules(stops=self.sampling.stop, tools=self.tools if self.tools is not None and self.tools.active
                           else None)


@dataclass(frozen=True)
class Planned:
    """The jobs of a /v1 request: one JobSpec per prompt, each with `n` seeds (choice i: seed + i)."""
    specs: list[JobSpec]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(spec.input_ids) for spec in self.specs)


def load_body(data: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    return body


# --- typed fields ----------------------------------------------------------------------------

def _number(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"`{name}` must be a number", name)
    if not lo <= value <= hi:
        raise InvalidRequest(f"`{name}` must be between {lo:g} and {hi:g}. Given: {value}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"`{name}` must be an integer", name)
    if not lo <= value <= hi:
        raise InvalidRequest(f"`{name}` must be between {lo} and {hi}. Given: {value}", name)
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"`{name}` must be a boolean", name)
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise InvalidRequest("`stop` must be a string or a list of strings", "stop")


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidRequest("`stream_options` must be an object", "stream_options")
    if not stream:
        raise InvalidRequest("`stream_options` is only allowed when `stream` is true", "stream_options")
    return _flag(options, "include_usage")


def _sampling(body: dict[str, Any], max_n: int, top_logprobs: int | None) -> Sampling:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return Sampling(
        max_tokens=_integer(body, name, 1, 2**32 - 1),
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0),  # 0 reaches /generate's rule: "must be > 0.0 and < 1.0"
        stop=_stop(body),
        seed=_integer(body, "seed", 0, U64 - 1),
        frequency_penalty=_number(body, "frequency_penalty", *PENALTY_RANGE) or 0.0,
        presence_penalty=_number(body, "presence_penalty", *PENALTY_RANGE) or 0.0,
        n=_integer(body, "n", 1, max_n) or 1,
        top_logprobs=top_logprobs)


def _model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("`model` must be a string", "model")
    return model


SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# vLLM's `structured_outputs` keys, and the constraint kind each names
STRUCTURED = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "lark"}


def _grammar(body: dict[str, Any]) -> str | None:
    """`response_format` (OpenAI's shapes, or TGI 3's and huggingface_hub's tagged one) or vLLM's
    `structured_outputs`, at most one of the two, checked and turned into the jobs' grammar."""
    rf, so = body.get("response_format"), body.get("structured_outputs")
    if rf is not None and so is not None:
        raise InvalidRequest("`response_format` and `structured_outputs` cannot both be given", "response_format")
    try:
        if rf is not None:
            return grammar_of(_response_format(rf))
        if so is not None:
            return grammar_of(_structured_outputs(so))
    except ConstraintError as exc:
        raise InvalidRequest(str(exc), "response_format" if rf is not None else "structured_outputs") from None
    return None


def _response_format(rf: Any) -> Constraint | None:
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise InvalidRequest("`response_format` must be an object with a string `type`", "response_format")
    kind = rf["type"]
    if "value" in rf:  # TGI 3's and huggingface_hub's shape: {"type": "json" | "json_schema" | "regex", "value"}
        return from_tagged(kind, rf["value"])
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json", {"type": "object"})
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequest("`response_format.json_schema` must be an object", "response_format")
        name = spec.get("name")
        if not isinstance(name, str) or not SCHEMA_NAME.fullmatch(name):
            raise InvalidRequest("`response_format.json_schema.name` must be 1 to 64 of a-z, A-Z, 0-9, _ and -",
                                 "response_format")
        return Constraint("json", spec.get("schema", {"type": "object"}))
    raise InvalidRequest(f"`response_format.type` must be one of text, json_object, json_schema "
                         f"(or a TGI grammar type with a `value`). Given: {kind}", "response_format")


def _structured_outputs(so: Any) -> Constraint:
    given = [key for key in STRUCTURED if isinstance(so, dict) and so.get(key) is not None]
    if len(given) != 1:
        raise InvalidRequest("`structured_outputs` must be an object with exactly one of "
                             + ", ".join(STRUCTURED), "structured_outputs")
    key = given[0]
    if key == "json":
        return from_tagged("json", so[key])
    return Constraint(STRUCTURED[key], so[key])


# --- the two request kinds -------------------------------------------------------------------

def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("`messages` must be a non-empty list of messages", "messages")
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"`{param}` must be an object with a string `role`", param)
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest(f"`{param}.content` parts must be text parts "
                                         "({\"type\": \"text\", \"text\": ...}); this model reads text only",
                                         f"{param}.content")
        elif content is not None and not isinstance(content, str):
            raise InvalidRequest(f"`{param}.content` must be a string or a list of text parts", f"{param}.content")
    return messages


def chat_request(body: dict[str, Any], max_n: int) -> V1Request:
    """A /v1/chat/completions body (the template is rendered later, for the routed model)."""
    messages = _messages(body)
    logprobs = _flag(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise InvalidRequest("`top_logprobs` needs `logprobs` set to true", "top_logprobs")
    stream = _flag(body, "stream")
    tools = read_tools(body)
    grammar = _grammar(body)
    if tools is not None and tools.active:
        if grammar is not None:
            raise InvalidRequest("`tools` and `response_format` cannot both be honoured: a tool call has its own "
                                 "format (set `tool_choice` to none to use `response_format`)", "response_format")
        try:
            grammar = grammar_of(tools.constraint())
        except ConstraintError as exc:
            raise InvalidRequest(f"a tool's parameters cannot be followed: {exc}", "tools") from None
    return V1Request(model=_model(body), prompts=[], sampling=_sampling(body, max_n, (top or 0) if logprobs else None),
                     stream=stream, include_usage=_include_usage(body, stream), add_special_tokens=False,
                     messages=messages, grammar=grammar, tools=tools)


def completion_request(body: dict[str, Any], max_n: int) -> V1Request:
    """A /v1/completions body: `prompt` is a string or a list of strings (one choice group each)."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidRequest("`prompt` must be a string or a non-empty list of strings", "prompt")
    if body.get("suffix") is not None:
        raise InvalidRequest("`suffix` is not supported", "suffix")
    if _flag(body, "echo"):
        raise InvalidRequest("`echo` is not supported", "echo")
    stream = _flag(body, "stream")
    logprobs = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)  # the legacy route's field: alternatives
    return V1Request(model=_model(body), prompts=prompts, sampling=_sampling(body, max_n, logprobs),
                     stream=stream, include_usage=_include_usage(body, stream), add_special_tokens=True,
                     grammar=_grammar(body))


# --- mapping onto /generate's rules ------------------------------------------------------------

def choices(request: V1Request) -> int:
    """How many jobs the request asks for: `n` per prompt."""
    return request.sampling.n * len(request.prompts)


def plan(model: ServedModel, request: V1Request) -> Planned:
    """Validate each prompt with /generate's rules and limits (TGI's messages); raise InvalidRequest."""
    s = request.sampling
    greedy = s.temperature == 0.0
    specs = []
    for prompt in request.prompts:
        ids = model.validator.tokenize(prompt, add_special_tokens=request.add_special_tokens)
        # TGI 3: without max_tokens a choice may fill what --max-total-tokens leaves after the prompt.
        room = model.limits.max_total_tokens - len(ids)
        if s.max_tokens is None and room < 1:
            raise InvalidRequest(f"Input validation error: `inputs` must have less than "
                                 f"{model.limits.max_input_length} tokens. Given: {len(ids)}",
                                 "prompt" if request.messages is None else "messages")
        max_new = s.max_tokens if s.max_tokens is not None else room
        raw = RawRequest(inputs=prompt, parameters=RawParameters(
            # temperature 0 is greedy whatever top_p says (OpenAI, vLLM): no warper is passed on then
            do_sample=not greedy, temperature=None if greedy else s.temperature,
            top_p=None if greedy or s.top_p is None or s.top_p >= 1.0 else s.top_p,
            max_new_tokens=max_new, stop=s.stop, seed=s.seed))
        try:
            valid = model.validator.validate(raw, input_ids=ids)
        except ValidationError as exc:  # /generate's rule and message; `param` in OpenAI's names
            raise InvalidRequest(exc.message, _param(exc.detail, request)) from None
        sampling: SamplingParams = dataclasses.replace(
            valid.sampling, frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty,
            top_n_tokens=s.top_logprobs or 0)
        specs.append(JobSpec(input_ids=valid.input_ids, sampling=sampling, stopping=valid.stopping,
                             seeds=_seeds(s.n, s.seed), want_tokens=request.stream or s.top_logprobs is not None,
                             grammar=request.grammar))
    return Planned(specs=specs)


def _seeds(n: int, seed: int | None) -> tuple[int, ...]:
    """Choice i samples with seed + i when the client gave a seed, else with its own random seed."""
    return tuple((seed + i) % U64 if seed is not None else random_seed() for i in range(n))


def _param(detail: str, request: V1Request) -> str | None:
    """The OpenAI field a /generate validation message is about: `max_new_tokens` (what a client
    can lower) when it is named, else the first `name` in the message."""
    if "`max_new_tokens`" in detail:
        return "max_tokens"
    match = re.search(r"`(\w+)`", detail)
    if match is None:
        return None
    name = match.group(1)
    if name in ("inputs", "truncate"):
        return "prompt" if request.messages is None else "messages"
    return name


