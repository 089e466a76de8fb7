"""Tool calls and answer shaping on /v1 (api/v1/tools.py, api/v1/answers.py), without a server: what the
model is shown, the grammar its answer follows (checked with llguidance on SmolLM2's tokenizer), calls
read back, stop sequences cut and held back in streams."""
from __future__ import annotations

import json

import pytest
from llguidance import LLMatcher, LLTokenizer

from api.v1.answers import AnswerRules
from api.v1.errors import InvalidRequest
from api.v1.tools import calls_in, read_tools
from common.schemas import FinalEvent, FinishReason, Token
from tests.support.tiny_model import smollm2_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def follows():
    tokenizer = smollm2_tokenizer()
    llt = LLTokenizer(tokenizer.backend_tokenizer.to_str())

    def check(tools, text: str) -> bool:
        matcher = LLMatcher(llt, tools.constraint().grammar(), log_level=0)
        ok = matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False))
        return ok and matcher.is_accepting()
    return check


def test_required_allows_only_calls_of_offered_functions_with_valid_arguments(follows):
    tools = read_tools({"tools": [WEATHER, TIME], "tool_choice": "required"})
    assert follows(tools, '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}')
    assert follows(tools, '{"tool_calls": [{"name": "get_time", "arguments": {}}, '
                          '{"name": "get_weather", "arguments": {"city": "Oslo"}}]}')
    assert not follows(tools, "It is sunny.")
    assert not follows(tools, '{"tool_calls": [{"name": "get_news", "arguments": {}}]}')
    assert not follows(tools, '{"tool_calls": [{"name": "get_weather", "arguments": {}}]}')  # city is required


def test_a_named_function_or_no_parallel_calls_means_exactly_one_call(follows):
    named = read_tools({"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert follows(named, '{"tool_calls": [{"name": "get_time", "arguments": {}}]}')
    assert not follows(named, '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]}')
    single = read_tools({"tools": [TIME], "tool_choice": "required", "parallel_tool_calls": False})
    two = '{"tool_calls": [{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {}}]}'
    assert not follows(single, two) and follows(read_tools({"tools": [TIME, WEATHER], "tool_choice": "required"}), two)
    # parallel calls are at most as many as the offered functions: a repeating model cannot run on
    assert not follows(read_tools({"tools": [TIME], "tool_choice": "required"}), two)


def test_auto_allows_text_or_a_call(follows):
    tools = read_tools({"tools": [WEATHER]})
    assert tools.choice == "auto"
    assert follows(tools, "Paris is sunny today.\nEnjoy!")
    assert follows(tools, '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}')
    assert not follows(tools, '{"tool_calls": "not a list"}')


def test_none_shows_no_tools_and_constrains_nothing():
    tools = read_tools({"tools": [WEATHER], "tool_choice": "none"})
    assert not tools.active and tools.constraint() is None
    messages, shown = tools.prompt([{"role": "user", "content": "hi"}], template_handles_tools=False)
    assert messages == [{"role": "user", "content": "hi"}] and shown is None


def test_a_template_without_tools_gets_them_in_a_system_message_and_calls_written_back():
    tools = read_tools({"tools": [WEATHER], "tool_choice": "required"})
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    messages, shown = tools.prompt(history, template_handles_tools=False)
    assert shown is None
    assert messages[0]["content"].startswith("Be brief.\n\nYou can call functions.")
    assert '"name": "get_weather"' in messages[0]["content"] and "You must call at least one" in messages[0]["content"]
    assert json.loads(messages[2]["content"]) == {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    assert "tool_calls" not in messages[2] and messages[3] == history[3]


def test_a_template_that_reads_tools_renders_them_itself():
    tools = read_tools({"tools": [WEATHER]})
    history = [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                     "function": {"name": "get_weather", "arguments": '{"city": "X"}'}}]}]
    messages, shown = tools.prompt(history, template_handles_tools=True)
    assert shown == [WEATHER]
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == {"city": "X"}  # as transformers expects


@pytest.mark.parametrize("body, param", [
    ({"tools": "x"}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0]"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_news"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tool_fields_are_refused_naming_the_field(body, param):
    with pytest.raises(InvalidRequest) as info:
        read_tools(body)
    assert info.value.param == param


def test_calls_come_back_in_openais_shape():
    [call] = calls_in('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}')
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert calls_in("Sunny.") is None and calls_in('{"tool_calls": [') is None


def final(text: str, reason: FinishReason) -> FinalEvent:
    return FinalEvent("r", 0, 0, Token(0, "", 0.0, False), text, reason, 1, None, 0.0, 0.0)


def test_a_matched_stop_sequence_is_cut_from_the_answer():
    rules = AnswerRules(stops=("END", "\n\n"))
    assert rules.answer(final("hello END", FinishReason.STOP_SEQUENCE)).content == "hello "
    assert rules.answer(final("hello END", FinishReason.LENGTH)).content == "hello END"  # not what ended it


def test_a_stream_holds_back_what_may_be_a_stop_sequence():
    stream = AnswerRules(stops=("STOP",)).stream()
    shown = [stream.token(Token(0, t, 0.0, False)) for t in ["a ", "ST", "ar", " S", "TO"]]
    assert shown == ["a ", "", "STar", " ", ""]  # "ST" is shown once it cannot begin "STOP"
    rest, answer = stream.final(final("a STar STOP", FinishReason.STOP_SEQUENCE))
    assert rest == "" and answer.content == "a STar " and answer.finish_reason == "stop"


def test_a_stream_shows_nothing_of_a_tool_call_until_it_is_complete():
    rules = AnswerRules(tools=read_tools({"tools": [WEATHER]}))
    stream = rules.stream()
    assert stream.token(Token(0, " ", 0.0, False)) == ""
    assert stream.token(Token(0, '{"tool', 0.0, False)) is None
    text = ' {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]}'
    rest, answer = stream.final(final(text, FinishReason.EOS_TOKEN))
    assert rest == "" and answer.finish_reason == "tool_calls" and answer.tool_calls[0]["function"]["name"] == "get_weather"
    text_stream = rules.stream()
    assert text_stream.token(Token(0, "Sunny", 0.0, False)) == "Sunny"
