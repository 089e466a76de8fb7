"""api.core.chat_template against transformers' apply_chat_template(tokenize=False): the same bytes for
SmolLM2's own template, a ChatML one and a Llama-3-style one; the sandbox; template lookup."""
from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import jinja2
import pytest
from transformers import PreTrainedTokenizerFast

from api.core.chat_template import ChatTemplate, TemplateError
from common.model_files import ensure_tokenizer, resolve

# Qwen2.5-style ChatML: a default system prompt, tool calls as JSON, `continue` (loop controls).
CHATML = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if loop.first and message.role == 'system' %}{% continue %}{% endif %}
    {%- if message.tool_calls is defined %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}{{ '\\n' + message.content }}{% endif %}
        {%- for call in message.tool_calls %}
            {{- '\\n<tool_call>\\n' + call.function | tojson + '\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Llama-3-style: bos_token, `set`, today's date from strftime_now, the system message pulled out, trimmed contents.
LLAMA3 = """\
{{- bos_token }}
{%- if date_string is not defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0].role == 'system' %}
    {%- set system_message = messages[0].content | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}
{{- system_message + eos_token }}
{%- for message in messages %}
    {%- set role = 'ipython' if message.role == 'tool' else message.role %}
    {{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' }}
    {%- if message.tool_calls is defined %}
        {{- message.tool_calls[0].function | tojson(indent=2) }}
    {%- else %}
        {{- message.content | trim }}
    {%- endif %}
    {{- eos_token }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Mistral-style: no system role, strict alternation, both enforced with raise_exception.
STRICT = """\
{{- bos_token }}
{%- for message in messages %}
    {%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message.role == 'user' %}
        {{- '[INST] ' + message.content + ' [/INST]' }}
    {%- elif message.role == 'assistant' %}
        {{- message.content + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

CHATS: dict[str, list[dict[str, Any]]] = {
    "user": [{"role": "user", "content": "Hi!"}],
    "system_user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    "multi_turn": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is 2+2?"},
                   {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}],
    "continue": [{"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "Autumn moon"}],
    "continue_trailing_space": [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "1, 2, "}],
    "continue_empty": [{"role": "user", "content": "Go on."}, {"role": "assistant", "content": ""}],
    "unicode": [{"role": "system", "content": "Réponds en français 🇫🇷"},
                {"role": "user", "content": "日本語で？ \u00fc\u0308 \u2028 \"quotes\" <b>&amp;</b>"}],
    "extra_keys": [{"role": "user", "content": "Hi!", "name": "ann"},
                   {"role": "assistant", "content": "Hello.", "tool_calls": None}, {"role": "user", "content": "Bye"}],
}
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "0", "type": "function",
         "function": {"name": "weather", "arguments": {"city": "Zürich", "unit": "°C"}}}]},
    {"role": "tool", "name": "weather", "content": "21 °C <sunny>"},
]


def _tokenizer_json() -> Path:
    return ensure_tokenizer(resolve("smollm2")) / "tokenizer.json"


def _hf_dir(path: Path, config: dict[str, Any], jinja: str | None = None) -> Path:
    """A tokenizer directory as the Hub ships one: SmolLM2's tokenizer.json plus our config/template."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(_tokenizer_json(), path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if jinja is not None:
        (path / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    return path


def _load(path: Path) -> tuple[PreTrainedTokenizerFast, ChatTemplate]:
    template = ChatTemplate.from_dir(path)
    assert template is not None
    return PreTrainedTokenizerFast.from_pretrained(str(path)), template


def expected(tokenizer: PreTrainedTokenizerFast, messages: list[dict[str, Any]]) -> str:
    """transformers' rendering under TGI's rule: continue a final assistant message, else prompt a new one."""
    continuing = messages[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(copy.deepcopy(messages), tokenize=False,
                                         add_generation_prompt=not continuing, continue_final_message=continuing)


def as_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same chat with each content split into several text parts (which TGI joins with nothing)."""
    def split(text: str) -> list[dict[str, str]]:
        half = len(text) // 2
        return [{"type": "text", "text": text[:half]}, {"type": "text", "text": text[half:]}]
    return [{**m, "content": split(m["content"])} for m in messages]


@pytest.fixture(scope="module", params=["smollm2", "chatml", "llama3"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    if request.param == "smollm2":
        return _load(ensure_tokenizer(resolve("smollm2")))
    if request.param == "chatml":
        config = {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML}
    else:
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3}
    return _load(_hf_dir(tmp_path_factory.mktemp(request.param), config))


@pytest.mark.parametrize("name", CHATS)
def test_same_bytes_as_transformers(pair, name: str) -> None:
    tokenizer, template = pair
    assert template.render(CHATS[name]) == expected(tokenizer, CHATS[name])


@pytest.mark.parametrize("name", ["multi_turn", "continue", "unicode"])
def test_content_parts_are_joined_like_tgi(pair, name: str) -> None:
    tokenizer, template = pair
    assert template.render(as_parts(CHATS[name])) == expected(tokenizer, CHATS[name])


def test_continue_ends_at_the_final_content(pair) -> None:
    _, template = pair
    assert template.render(CHATS["continue"]).endswith("Autumn moon")


@pytest.mark.parametrize("source", [CHATML, LLAMA3], ids=["chatml", "llama3"])
def test_tool_calls_and_tool_messages_pass_through(tmp_path: Path, source: str) -> None:
    tokenizer, template = _load(_hf_dir(tmp_path, {"eos_token": "<|eot_id|>", "chat_template": source}))
    rendered = template.render(TOOL_CHAT)
    assert rendered == expected(tokenizer, TOOL_CHAT)
    assert "Zürich" in rendered and "°C" in rendered  # tojson keeps non-ASCII, as transformers' does


# A template that lists the tools it is given, as tool-calling models' templates do.
TOOLS_TEMPLATE = """\
{%- if tools %}{{- '<tools>' }}{% for tool in tools %}{{ tool | tojson }}{% endfor %}{{- '</tools>\\n' }}{% endif %}
{%- for message in messages %}{{- message.role + ': ' + (message.content or '') + '\\n' }}{% endfor %}
{%- if add_generation_prompt %}{{- 'assistant: ' }}{% endif %}
"""
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast for a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_tools_are_passed_to_the_template_as_transformers_passes_them(tmp_path: Path) -> None:
    tokenizer, template = _load(_hf_dir(tmp_path, {"eos_token": "</s>", "chat_template": TOOLS_TEMPLATE}))
    chat = [{"role": "user", "content": "Weather in Oslo?"}]
    assert template.handles_tools
    rendered = template.render(chat, TOOLS)
    assert rendered == tokenizer.apply_chat_template(copy.deepcopy(chat), tools=TOOLS, tokenize=False,
                                                     add_generation_prompt=True)
    assert '"name": "get_weather"' in rendered
    assert not ChatTemplate(CHATML, None, "<|im_end|>").handles_tools  # reads tool_calls, not the tool list


def test_the_default_model_keeps_its_gguf_template_in_chat_template_jinja() -> None:
    import gguf

    source = resolve("smollm2")
    field = gguf.GGUFReader(str(source.path)).fields["tokenizer.chat_template"]
    converted = ensure_tokenizer(source)
    assert (converted / "chat_template.jinja").read_text(encoding="utf-8") == field.contents()
    template = ChatTemplate.from_dir(converted)
    assert template is not None and template.source == field.contents()
    assert (template.bos_token, template.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_raise_exception_becomes_a_template_error_with_its_message(tmp_path: Path) -> None:
    tokenizer, template = _load(_hf_dir(tmp_path, {"bos_token": "<s>", "eos_token": "</s>", "chat_template": STRICT}))
    valid = CHATS["multi_turn"][1:]
    assert template.render(valid) == expected(tokenizer, valid)
    cases = {"Only user and assistant roles are supported!":
                 [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
             "Conversation roles must alternate user/assistant/user/assistant/...":
                 [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    for message, chat in cases.items():
        with pytest.raises(jinja2.TemplateError, match=re.escape(message)):
            expected(tokenizer, chat)
        with pytest.raises(TemplateError) as info:
            template.render(chat)
        assert str(info.value) == message


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages[0].content.__len__() }}",
    "{{ messages.append(1) }}",
    "{{ messages[0].update(role='x') }}",
    "{% set ns = namespace() %}{% set ns.__html__ = 1 %}",
    "{{ namespace(_hidden=1) }}",
], ids=["str-mro", "dunder-call", "append", "update", "namespace-set", "namespace-init"])
def test_the_sandbox_blocks_escapes(source: str) -> None:
    with pytest.raises(TemplateError):
        ChatTemplate(source, None, None).render(CHATS["user"])


@pytest.mark.parametrize("source", ["{{ messages.__class__ }}", "{{ raise_exception.__globals__ }}"])
def test_an_unsafe_attribute_alone_renders_as_undefined(source: str) -> None:
    assert ChatTemplate(source, None, None).render(CHATS["user"]) == ""


def test_template_globals_filters_and_tags_match_transformers(tmp_path: Path) -> None:
    source = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
              "{% if m.role == 'system' %}{% continue %}{% endif %}{% generation %}{{ m.content }}{% endgeneration %}"
              "{% if ns.n > 2 %}{% break %}{% endif %}{% endfor %}|{{ ns.n }}|{{ dict(a='é<', b=[1]) | tojson }}"
              "|{{ dict.fromkeys(['x']) | tojson(sort_keys=true, separators=(',', ':')) }}|{{ tools }}{{ documents }}"
              "|{{ unk_token is defined }}{{ bos_token is defined }}|{{ strftime_now('%Y') | length }}")
    tokenizer, template = _load(_hf_dir(tmp_path, {"eos_token": "</s>", "chat_template": source}))
    assert template.render(CHATS["multi_turn"]) == expected(tokenizer, CHATS["multi_turn"])


def test_errors_a_client_sees() -> None:
    with pytest.raises(TemplateError, match="no messages"):
        ChatTemplate("{{ messages }}", None, None).render([])
    with pytest.raises(TemplateError, match="unexpected '}'"):
        ChatTemplate("{{ messages }", None, None).render(CHATS["user"])
    with pytest.raises(TemplateError, match="unsupported operand"):
        ChatTemplate("{{ messages | length + 'x' }}", None, None).render(CHATS["user"])
    with pytest.raises(TemplateError, match="no content to continue"):
        ChatTemplate("{{ messages }}", None, None).render([{"role": "assistant", "content": None}])
    with pytest.raises(TemplateError, match="cannot be continued"):  # the template drops assistant messages
        ChatTemplate("{% for m in messages if m.role == 'user' %}{{ m.content }}{% endfor %}", None, None).render(
            CHATS["continue"])


def test_image_parts_become_markdown_links_as_in_tgi() -> None:
    chat = [{"role": "user", "content": [{"type": "text", "text": "What is this? "},
                                         {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]
    assert ChatTemplate("{{ messages[0].content }}", None, None).render(chat) == "What is this? ![](https://x/y.png)"


def test_render_leaves_the_callers_messages_alone() -> None:
    chat = as_parts(CHATS["continue"])
    before = copy.deepcopy(chat)
    ChatTemplate(CHATML, None, None).render(chat)
    assert chat == before


def test_from_dir_without_a_template_is_none(tmp_path: Path) -> None:
    assert ChatTemplate.from_dir(_hf_dir(tmp_path / "a", {"eos_token": "</s>"})) is None
    (tmp_path / "b").mkdir()
    assert ChatTemplate.from_dir(tmp_path / "b") is None  # no tokenizer_config.json at all
    no_default = {"chat_template": [{"name": "tool_use", "template": "{{ tools }}"}]}
    assert ChatTemplate.from_dir(_hf_dir(tmp_path / "c", no_default)) is None


def test_from_dir_reads_list_templates_and_added_token_dicts(tmp_path: Path) -> None:
    config = {"bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False,
                            "normalized": False, "rstrip": False, "single_word": False, "special": True},
              "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "special": True},
              "chat_template": [{"name": "tool_use", "template": "{{ tools }}"},
                                {"name": "default", "template": LLAMA3}]}
    tokenizer, template = _load(_hf_dir(tmp_path, config))
    assert (template.source, template.bos_token, template.eos_token) == (LLAMA3, "<|begin_of_text|>", "<|eot_id|>")
    for chat in CHATS.values():
        assert template.render(chat) == expected(tokenizer, chat)


def test_chat_template_jinja_wins_over_tokenizer_config(tmp_path: Path) -> None:
    config = {"eos_token": "<|im_end|>", "chat_template": "config {{ messages }}"}
    tokenizer, template = _load(_hf_dir(tmp_path, config, jinja=CHATML))
    assert template.source == CHATML
    assert template.render(CHATS["multi_turn"]) == expected(tokenizer, CHATS["multi_turn"])
