"""TGI 0.5.0 request parsing and validation: every message, status and the order of the checks."""
from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.tgi.parsing import Rejection, parse_and_validate, parse_request
from api.core.validation import Validator, check_best_of
from common.errors import Overloaded, ValidationError
from common.settings import LimitSettings
from tests.support.tiny_tokenizer import build

LIMITS = LimitSettings(max_input_length=10, max_total_tokens=32, max_best_of=2, max_stop_sequences=2)
V = Validator(LIMITS, build())
JSON = "application/json"


def run(body: Any, *, compat: bool = False, stream: bool | None = None, validator: Validator = V):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_and_validate(data, JSON, validator, compat=compat, stream=stream)


def message(body: Any, **kw: Any) -> str:
    with pytest.raises(ValidationError) as info:
        run(body, **kw)
    assert info.value.status_code == 422 and info.value.error_type == "validation"
    return info.value.message


def rejection(body: bytes, content_type: str | None = JSON, compat: bool = False) -> tuple[int, str]:
    with pytest.raises(Rejection) as info:
        parse_request(body, content_type, compat=compat)
    return info.value.status, info.value.text


def params(**p: Any) -> dict[str, Any]:
    return {"inputs": "hello world", "parameters": p}


# --- §3.2: every message ---------------------------------------------------------------------

P = "Input validation error: "


@pytest.mark.parametrize("body, kw, expected", [
    (params(best_of=3, do_sample=True), {}, "`best_of` must be > 0 and <= 2. Given: 3"),
    (params(best_of=2), {}, "you must use sampling when `best_of` is > 1"),
    (params(best_of=2, do_sample=True, seed=1), {}, "`seed` must not be set when `best_of` > 1"),
    (params(best_of=2, do_sample=True), {"stream": True}, "`best_of` != 1 is not supported when streaming tokens"),
    (params(best_of=0), {"stream": True}, "`best_of` != 1 is not supported when streaming tokens"),
    (params(temperature=0), {}, "`temperature` must be strictly positive"),
    (params(temperature=-1.5), {}, "`temperature` must be strictly positive"),
    (params(temperature=1e-50), {}, "`temperature` must be strictly positive"),  # f32: rounds to 0
    (params(repetition_penalty=0.0), {}, "`repetition_penalty` must be strictly positive"),
    (params(top_p=1.0), {}, "`top_p` must be > 0.0 and < 1.0"),
    (params(top_p=0), {}, "`top_p` must be > 0.0 and < 1.0"),
    (params(top_p=0.99999999), {}, "`top_p` must be > 0.0 and < 1.0"),  # f32: rounds to 1.0
    (params(top_k=0), {}, "`top_k` must be strictly positive"),
    (params(top_k=-3), {}, "`top_k` must be strictly positive"),
    (params(truncate=0), {}, "`truncate` must be strictly positive and less than 10. Given: 0"),
    (params(truncate=11), {}, "`truncate` must be strictly positive and less than 10. Given: 11"),
    (params(typical_p=1), {}, "`typical_p` must be > 0.0 and < 1.0"),
    (params(max_new_tokens=0), {}, "`max_new_tokens` must be strictly positive"),
    (params(max_new_tokens=30), {},  # 3 prompt tokens (<s> hello world)
     "`inputs` tokens + `max_new_tokens` must be <= 32. Given: 3 `inputs` tokens and 30 `max_new_tokens`"),
    ({"inputs": "a " * 11, "parameters": {"max_new_tokens": 1}}, {},
     "`inputs` must have less than 10 tokens. Given: 12"),
    ({"inputs": ""}, {}, "`inputs` cannot be empty"),
    (params(stop=["a", "b", "c"]), {}, "`stop` supports up to 2 stop sequences. Given: 3"),
])
def test_messages(body: Any, kw: dict[str, Any], expected: str) -> None:
    assert message(body, **kw) == P + expected


def test_best_of_disabled() -> None:
    v = Validator(LimitSettings(max_input_length=10, max_total_tokens=16, max_best_of=1), build())
    assert message(params(best_of=2, do_sample=True), validator=v) == \
        P + "`best_of` != 1 is not allowed for this endpoint"


def test_max_new_tokens_without_fast_tokenizer() -> None:
    v = Validator(LIMITS, None)
    assert message(params(max_new_tokens=23), validator=v) == \
        P + "`max_new_tokens` must be <= 22. Given: 23"
    assert run(params(max_new_tokens=4, truncate=2), validator=v).input_ids == ()


def test_tokenizer_error() -> None:
    v = Validator(LIMITS, build(unk=False))  # a real tokenizer that cannot encode unknown words
    assert message({"inputs": "unknown"}, validator=v) == \
        P + "tokenizer error WordLevel error: Missing [UNK] token from the vocabulary"


# --- accepted values -------------------------------------------------------------------------

def test_defaults_and_nulls() -> None:
    nulls = dict.fromkeys(["best_of", "temperature", "repetition_penalty", "top_k", "top_p", "typical_p",
                           "return_full_text", "truncate", "seed"])
    for body in ({"inputs": "hello"}, {"inputs": "hello", "parameters": nulls},
                 {"inputs": "hello", "parameters": {}, "decoder_input_details": True, "extra": [1, {"x": None}]},
                 ["hello"]):
        valid = run(body)
        assert valid.stopping.max_new_tokens == 20 and valid.stopping.stop == ()
        assert valid.details is False and valid.return_full_text is None and valid.best_of == 1
        assert valid.sampling.top_k == 0 and valid.sampling.top_p == 1.0 and valid.sampling.typical_p == 1.0
        assert valid.sampling.temperature == 1.0 and not valid.sampling.do_sample
        assert valid.seed_given is False
        assert valid.input_ids == (1, 3)


def test_limits_are_inclusive() -> None:
    assert run(params(top_p=0.95, typical_p=0.5, top_k=1, truncate=10)).sampling.top_k == 1
    assert run(params(max_new_tokens=29)).stopping.max_new_tokens == 29  # 3 + 29 == 32
    assert len(run({"inputs": "a " * 9, "parameters": {"max_new_tokens": 1}}).input_ids) == 10


def test_best_of_zero_is_one_on_generate() -> None:
    assert run(params(best_of=0)).best_of == 1
    assert run(params(best_of=1, seed=5)).best_of == 1


def test_best_of_sampling_counts_any_given_warper() -> None:
    assert run(params(best_of=2, temperature=1.0)).best_of == 2  # TGI: "set" counts, even 1.0


def test_truncate_keeps_the_last_tokens() -> None:
    valid = run({"inputs": "a b c a b c a b c a b c a b", "parameters": {"truncate": 3, "max_new_tokens": 2}})
    ids = build().encode("a b c a b c a b c a b c a b").ids
    assert valid.input_ids == tuple(ids[-3:])


def test_seeds_survive_u64() -> None:
    valid = run(params(seed=2**64 - 1))
    assert valid.sampling.seed == 2**64 - 1 and valid.seed_given


def test_huge_temperature_is_clamped_to_f32_max() -> None:
    assert run(params(temperature=1e39)).sampling.temperature == pytest.approx(3.4028234663852886e38)


# --- order of checks -------------------------------------------------------------------------

def test_order_multi_fault() -> None:
    # best_of without any sampling parameter is checked first of all
    assert message({"inputs": "", "parameters": dict(best_of=2, repetition_penalty=0, max_new_tokens=0,
                                                     stop=["a", "b", "c"], seed=1, truncate=0)}) == \
        P + "you must use sampling when `best_of` is > 1"
    everything = dict(best_of=2, do_sample=True, temperature=0, repetition_penalty=0, top_p=1.0, typical_p=1.0,
                      top_k=0, max_new_tokens=0, stop=["a", "b", "c"], seed=1, truncate=0)
    order = [
        ("temperature", "`temperature` must be strictly positive"),
        ("repetition_penalty", "`repetition_penalty` must be strictly positive"),
        ("top_p", "`top_p` must be > 0.0 and < 1.0"),
        ("typical_p", "`typical_p` must be > 0.0 and < 1.0"),
        ("top_k", "`top_k` must be strictly positive"),
        ("max_new_tokens", "`max_new_tokens` must be strictly positive"),
        ("stop", "`stop` supports up to 2 stop sequences. Given: 3"),
        ("seed", "`seed` must not be set when `best_of` > 1"),
    ]
    body = {"inputs": "", "parameters": dict(everything)}
    for key, expected in order:
        assert message(body) == P + expected
        del body["parameters"][key]
    assert message(body) == P + "`inputs` cannot be empty"
    body["inputs"] = "a " * 20
    assert message(body) == P + "`truncate` must be strictly positive and less than 10. Given: 0"
    body["parameters"]["truncate"] = None
    body["parameters"]["max_new_tokens"] = 12
    # MaxTotalTokens is checked before InputLength
    assert message(body) == P + ("`inputs` tokens + `max_new_tokens` must be <= 32. "
                                 "Given: 21 `inputs` tokens and 12 `max_new_tokens`")
    body["parameters"]["max_new_tokens"] = 1
    assert message(body) == P + "`inputs` must have less than 10 tokens. Given: 21"


def test_handler_best_of_before_overload_before_validation() -> None:
    calls: list[int] = []

    def overloaded(copies: int) -> None:
        calls.append(copies)
        raise Overloaded()

    # best_of over the limit: the handler-level check wins, the 429 hook is not reached
    with pytest.raises(ValidationError, match="must be > 0 and <= 2"):
        parse_and_validate(json.dumps(params(best_of=5, temperature=0)).encode(), JSON, V, overloaded=overloaded)
    assert calls == []
    # otherwise 429 comes before validation errors, with one permit per best_of copy
    with pytest.raises(Overloaded):
        parse_and_validate(json.dumps(params(best_of=2, temperature=0)).encode(), JSON, V, overloaded=overloaded)
    assert calls == [2]


def test_check_best_of_counts_copies() -> None:
    assert check_best_of(parse_request(b'{"inputs":"x","parameters":{"best_of":2}}', JSON).parameters,
                         LIMITS, stream=False) == 2


# --- extractor rejections (plain text) -------------------------------------------------------

D = "Failed to deserialize the JSON body into the target type: "
S = "Failed to parse the request body as JSON: "


@pytest.mark.parametrize("body, status, text", [
    (b'{"inputs":"x","parameters":{"max_new_tokens":-1}}', 422,
     D + "parameters.max_new_tokens: invalid value: integer `-1`, expected u32 at line 1 column 47"),
    (b'{"inputs":"x","parameters":{"max_new_tokens":null}}', 422,
     D + "parameters.max_new_tokens: invalid type: null, expected u32 at line 1 column 49"),
    (b'{"inputs":"x","parameters":{"max_new_tokens":4294967296}}', 422,
     D + "parameters.max_new_tokens: invalid value: integer `4294967296`, expected u32 at line 1 column 55"),
    (b'{"inputs":"x","parameters":{"do_sample":null}}', 422,
     D + "parameters.do_sample: invalid type: null, expected a boolean at line 1 column 44"),
    (b'{"inputs":"x","parameters":{"stop":null}}', 422,
     D + "parameters.stop: invalid type: null, expected a sequence at line 1 column 39"),
    (b'{"inputs":"x","parameters":{"watermark":null}}', 422,
     D + "parameters.watermark: invalid type: null, expected a boolean at line 1 column 44"),
    (b'{"inputs":"x","parameters":{"details":null}}', 422,
     D + "parameters.details: invalid type: null, expected a boolean at line 1 column 42"),
    (b'{"inputs":"x","parameters":{"details":1}}', 422,
     D + "parameters.details: invalid type: integer `1`, expected a boolean at line 1 column 39"),
    (b'{"inputs":"x","parameters":{"seed":-1}}', 422,
     D + "parameters.seed: invalid value: integer `-1`, expected u64 at line 1 column 37"),
    (b'{"inputs":"x","parameters":{"best_of":-1}}', 422,
     D + "parameters.best_of: invalid value: integer `-1`, expected usize at line 1 column 40"),
    (b'{"inputs":"x","parameters":{"truncate":1.5}}', 422,
     D + "parameters.truncate: invalid type: floating point `1.5`, expected usize at line 1 column 42"),
    (b'{"inputs":"x","parameters":{"temperature":"hot"}}', 422,
     D + 'parameters.temperature: invalid type: string "hot", expected f32 at line 1 column 47'),
    (b'{"inputs":"x","parameters":{"stop":["a",2]}}', 422,
     D + "parameters.stop[1]: invalid type: integer `2`, expected a string at line 1 column 41"),
    (b'{"inputs":"x","parameters":"x"}', 422,
     D + 'parameters: invalid type: string "x", expected struct GenerateParameters at line 1 column 30'),
    (b'{"inputs":"x","parameters":{"top_k":2147483648}}', 422,
     D + "parameters.top_k: invalid value: integer `2147483648`, expected i32 at line 1 column 46"),
    (b'{"inputs":"x","parameters":{"stop":{}}}', 422,
     D + "parameters.stop: invalid type: map, expected a sequence at line 1 column 35"),
    (b'["x", {}, false]', 400, S + "trailing characters at line 1 column 11"),
    (b'{"inputs":"x","parameters":null}', 422,
     D + "parameters: invalid type: null, expected struct GenerateParameters at line 1 column 31"),
    (b'{}', 422, D + "missing field `inputs` at line 1 column 2"),
    (b'{"inputs":null}', 422, D + "inputs: invalid type: null, expected a string at line 1 column 14"),
    (b'{"inputs":"a","inputs":"b"}', 422, D + "duplicate field `inputs` at line 1 column 22"),
    (b'"hello"', 422, D + 'invalid type: string "hello", expected struct GenerateRequest at line 1 column 7'),
    (b'', 400, S + "EOF while parsing a value at line 1 column 0"),
    (b'{"inputs":', 400, S + "EOF while parsing a value at line 1 column 10"),
    (b'{"inputs":"x",}', 400, S + "trailing comma at line 1 column 15"),
    (b'{"inputs":"x"}}', 400, S + "trailing characters at line 1 column 15"),
    (b'{"inputs":NaN}', 400, S + "expected value at line 1 column 11"),
    (b'{"inputs":"x","parameters":{"seed":1e999}}', 400, S + "number out of range at line 1 column 40"),
    (b'{"inputs":"\xff\xfe"}', 400, S + "invalid unicode code point at line 1 column 11"),
])
def test_rejections(body: bytes, status: int, text: str | None) -> None:
    got_status, got_text = rejection(body)
    assert got_status == status
    if text is not None:
        assert got_text == text


def test_struct_as_sequence() -> None:
    """serde derive accepts a struct as an array of its fields in declaration order."""
    req = parse_request(b'["x", [null, 0.5, null, null, null, null, true, 5]]', JSON)
    assert req.inputs == "x" and req.parameters.temperature == 0.5 and req.parameters.max_new_tokens == 5
    assert req.parameters.do_sample is True


def test_compat_stream_field() -> None:
    assert parse_request(b'{"inputs":"x","stream":true}', JSON, compat=True).stream is True
    assert parse_request(b'{"inputs":"x","stream":true}', JSON).stream is False  # ignored on /generate
    assert rejection(b'{"inputs":"x","stream":null}', compat=True) == (
        422, D + "stream: invalid type: null, expected a boolean at line 1 column 27")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "json"])
def test_content_type_415(content_type: str | None) -> None:
    assert rejection(b'{"inputs":"x"}', content_type) == (415, "Expected request with `Content-Type: application/json`")


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/vnd.api+json"])
def test_content_type_accepted(content_type: str) -> None:
    assert parse_request(b'{"inputs":"x"}', content_type).inputs == "x"


# --- property: nothing but the documented errors ---------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_values = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
param_names = st.sampled_from(["best_of", "temperature", "repetition_penalty", "top_k", "top_p", "typical_p",
                               "do_sample", "max_new_tokens", "return_full_text", "stop", "truncate",
                               "watermark", "details", "seed", "other"])
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"inputs": st.one_of(st.text(max_size=40), json_leaf)},
                          optional={"parameters": st.dictionaries(param_names, json_values, max_size=6),
                                    "stream": json_leaf}))


@settings(max_examples=400, deadline=None)
@given(body=bodies, compat=st.booleans(), stream=st.sampled_from([None, True, False]))
def test_validator_raises_only_documented_errors(body: Any, compat: bool, stream: bool | None) -> None:
    try:
        valid = run(json.dumps(body).encode(), compat=compat, stream=stream)
    except Rejection as exc:
        assert exc.status in (400, 422)
    except ValidationError as exc:
        assert exc.message.startswith(P)
    else:
        assert valid.inputs and 1 <= valid.best_of <= LIMITS.max_best_of
        assert len(valid.input_ids) <= LIMITS.max_input_length
        assert len(valid.input_ids) + valid.stopping.max_new_tokens <= LIMITS.max_total_tokens


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=60))
def test_arbitrary_bytes_never_crash(raw: bytes) -> None:
    try:
        run(raw)
    except (Rejection, ValidationError):
        pass
