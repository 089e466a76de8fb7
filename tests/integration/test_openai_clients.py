"""The /v1 routes and TGI 3's extras through the clients people call them with: the `openai` SDK and
`huggingface_hub.InferenceClient`, against real stacks (redis-server, `tgq api`, `tgq worker` with
the tiny random Llama that has SmolLM2's tokenizer and chat template).

Besides the shared `stack`, the module starts two API processes without workers of their own:
`idle` serves a model id no worker takes (jobs wait until --request-timeout: 429s and mid-stream
failures), `keyed` has --api-key and small limits and shares the stack's worker (same model id, so
same queue). The tiny model's greedy text repeats the prompt's last token, which keeps expected
texts readable: distinct prompts give distinct texts, and penalties visibly change them.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import openai
import orjson
import pytest
import redis
import requests
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError, TextGenerationError
from rq import Queue
from tokenizers import Tokenizer

from common.protocol import queue_name
from tests.support.processes import start_api, wait_http

from .conftest import MODEL_ID

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Write one word about the sea."}]
IDLE_ID = "idle"  # no worker serves tgq:idle
IDLE_TIMEOUT_S = 3
API_KEY = "s3cret-key"
KEYED_MAX_INPUT, KEYED_MAX_TOTAL = 40, 64


def client(url: str, api_key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def oai(stack) -> openai.OpenAI:
    return client(stack.url)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def fast_tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_file(str(Path(tiny_model_dir) / "tokenizer.json"))


@pytest.fixture(scope="module")
def idle(stack, tiny_model_dir):
    """An API for a model no worker serves: --max-queue-length 1 and a short --request-timeout."""
    api, url = start_api(stack.redis_url, tiny_model_dir, "--model-id", IDLE_ID, "--max-queue-length", "1",
                         "--request-timeout", str(IDLE_TIMEOUT_S))
    try:
        wait_http(url, [api])
        yield url
    finally:
        api.stop()


@pytest.fixture
def idle_url(idle, stack):
    """The idle API with its queue empty (a timed-out request's job stays queued: nobody takes it)."""
    Queue(queue_name(IDLE_ID), connection=redis.Redis.from_url(stack.redis_url)).empty()
    return idle


@pytest.fixture(scope="module")
def keyed(stack, tiny_model_dir):
    """An API with --api-key and small limits on the stack's model id: the stack's worker answers its jobs."""
    api, url = start_api(stack.redis_url, tiny_model_dir, "--model-id", MODEL_ID, "--api-key", API_KEY,
                         "--max-input-length", str(KEYED_MAX_INPUT), "--max-total-tokens", str(KEYED_MAX_TOTAL))
    try:
        wait_http(url, [api])
        yield url
    finally:
        api.stop()


def chat(oai: openai.OpenAI, **kw):
    args = {"model": MODEL_ID, "messages": MESSAGES, "temperature": 0, "max_tokens": 8, **kw}
    return oai.chat.completions.create(**args)


# --- chat ------------------------------------------------------------------------------------

def test_chat_stream_deltas_join_to_the_non_stream_content(oai):
    full = chat(oai)
    assert full.object == "chat.completion" and full.model == MODEL_ID
    assert len(full.choices) == 1
    choice = full.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert choice.message.content
    assert choice.logprobs is None
    assert full.usage.completion_tokens == 8

    chunks = list(chat(oai, stream=True))
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    reasons = [c.choices[0].finish_reason for c in chunks]
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for


def test_text_parts_are_joined_with_nothing(oai):
    parts = [{"type": "text", "text": "Write one word"}, {"type": "text", "text": " about the sea."}]
    assert chat(oai, messages=[{"role": "user", "content": parts}]).choices[0].message.content == \
        chat(oai).choices[0].message.content
    # and the templated prompts are the same tokens
    assert chat(oai, messages=[{"role": "user", "content": parts}]).usage.prompt_tokens == chat(oai).usage.prompt_tokens


def test_chat_usage_counts_the_templated_prompt(oai, stack, hf_tokenizer, fast_tokenizer):
    text = hf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = fast_tokenizer.encode(text, add_special_tokens=False).ids
    resp = requests.post(stack.url + "/chat_tokenize", json={"model": MODEL_ID, "messages": MESSAGES}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["templated_text"] == text
    assert [t["id"] for t in resp.json()["tokenize_response"]] == ids

    full = chat(oai, max_tokens=5)
    assert full.usage.prompt_tokens == len(ids)
    assert full.usage.completion_tokens == 5 and full.choices[0].finish_reason == "length"
    assert full.usage.total_tokens == len(ids) + 5

    chunks = list(chat(oai, max_tokens=5, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == \
        (len(ids), 5, len(ids) + 5)
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == full.choices[0].message.content


def test_chat_stops_at_a_stop_string_with_finish_reason_stop(oai):
    first = chat(oai, max_tokens=4).choices[0].message.content
    stop = first[:1]  # the first generated character
    full = chat(oai, max_tokens=8, stop=[stop])
    assert full.choices[0].finish_reason == "stop"
    assert full.usage.completion_tokens < 8
    chunks = list(chat(oai, max_tokens=8, stop=[stop], stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content


# --- completions -------------------------------------------------------------------------------

PROMPTS = ["The capital of France is", "Once upon a time, there", "def fibonacci(n):"]


def complete(oai: openai.OpenAI, prompt, **kw):
    return oai.completions.create(**{"model": MODEL_ID, "prompt": prompt, "temperature": 0, "max_tokens": 6, **kw})


def test_completions_one_choice_per_prompt_in_order(oai, fast_tokenizer):
    singles = [complete(oai, p) for p in PROMPTS]
    for single, prompt in zip(singles, PROMPTS):
        assert single.object == "text_completion"
        assert [c.index for c in single.choices] == [0]
        assert single.choices[0].finish_reason == "length"
        assert single.usage.prompt_tokens == len(fast_tokenizer.encode(prompt).ids)
        assert single.usage.completion_tokens == 6
    texts = [s.choices[0].text for s in singles]
    assert len(set(texts)) == len(texts), texts  # distinct prompts, distinct greedy texts: the order shows

    both = complete(oai, PROMPTS)
    assert [c.index for c in both.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in both.choices] == texts
    assert both.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert both.usage.completion_tokens == 6 * len(PROMPTS)

    streamed = [""] * len(PROMPTS)
    reasons: dict[int, list] = {i: [] for i in range(len(PROMPTS))}
    for chunk in complete(oai, PROMPTS, stream=True):
        assert chunk.object == "text_completion"
        (choice,) = chunk.choices
        streamed[choice.index] += choice.text
        reasons[choice.index].append(choice.finish_reason)
    assert streamed == texts
    for rs in reasons.values():
        assert rs[-1] == "length" and set(rs[:-1]) <= {None}


def test_completions_stream_usage_chunk(oai, fast_tokenizer):
    chunks = list(complete(oai, PROMPTS[0], stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == len(fast_tokenizer.encode(PROMPTS[0]).ids)
    assert chunks[-1].usage.completion_tokens == 6
    assert "".join(c.choices[0].text for c in chunks[:-1]) == complete(oai, PROMPTS[0]).choices[0].text


# The tiny model repeats its prompt's last token. "東京" ends in a byte-level token that is the tail of a
# three-byte character, so every generated token is an incomplete character: a full decode writes
# U+FFFD for them, and the stream's incremental decoder holds them back waiting for the rest.
CUT_PROMPT = "Tokyo is 東京"


@pytest.mark.parametrize("max_tokens", [1, 9])
def test_stream_text_equals_non_stream_when_generation_ends_inside_a_character(oai, max_tokens):
    full = complete(oai, CUT_PROMPT, max_tokens=max_tokens).choices[0].text
    assert full == "\ufffd" * max_tokens  # transformers' decode of these tokens, as the worker decodes
    streamed = "".join(c.choices[0].text for c in complete(oai, CUT_PROMPT, max_tokens=max_tokens, stream=True))
    assert streamed == full
    messages = [{"role": "user", "content": "Say Tokyo"}, {"role": "assistant", "content": CUT_PROMPT}]
    content = chat(oai, messages=messages, max_tokens=max_tokens).choices[0].message.content
    assert content == full  # the final assistant message is continued from its last token
    chunks = chat(oai, messages=messages, max_tokens=max_tokens, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == content


# --- models ------------------------------------------------------------------------------------

def test_models_list(oai, stack):
    page = oai.models.list()
    assert [m.id for m in page.data] == [MODEL_ID]
    (model,) = page.data
    assert model.object == "model" and model.owned_by == "tgq"
    assert isinstance(model.created, int) and abs(model.created - time.time()) < 3600
    assert model.model_extra["workers"] == 1
    raw = requests.get(stack.url + "/v1/models", timeout=30).json()
    # `created` is taken once by gunicorn's master: every API process answers the same value
    assert raw["data"][0].pop("created") == model.created
    assert raw == {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "tgq", "workers": 1}]}


def test_one_model_answers_to_any_name(oai):
    expected = chat(oai).choices[0].message.content
    for name in ("gpt-4o", "tgi", "dummy", "tiny"):
        resp = chat(oai, model=name)
        assert resp.choices[0].message.content == expected
        assert resp.model == MODEL_ID


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kw", "param"), [
    ({"temperature": 5}, "temperature"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"n": 9}, "n"),  # --max-n defaults to 8
    ({"top_logprobs": 2}, "top_logprobs"),  # top_logprobs without logprobs
    ({"max_tokens": 0}, "max_tokens"),
])
def test_invalid_requests_raise_bad_request(oai, kw, param):
    with pytest.raises(openai.BadRequestError) as info:
        chat(oai, **kw)
    assert info.value.status_code == 400
    assert info.value.body["type"] == "invalid_request_error"
    assert info.value.body["param"] == param
    assert chat(oai, max_tokens=2).choices[0].finish_reason == "length"  # still serving


def test_n_at_max_n_is_accepted(oai):
    resp = chat(oai, n=8, max_tokens=1, temperature=1.0, seed=3)
    assert [c.index for c in resp.choices] == list(range(8))


def test_validation_errors_of_generate_are_400(oai, stack):
    with pytest.raises(openai.BadRequestError) as info:
        chat(oai, max_tokens=5000)  # past --max-total-tokens (1512): /generate's validation message
    assert "max_new_tokens" in info.value.message
    assert info.value.body["param"] == "max_tokens"
    resp = requests.post(stack.url + "/v1/chat/completions", data=b"{not json", timeout=30,
                         headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_api_key(keyed):
    with pytest.raises(openai.AuthenticationError) as info:
        chat(client(keyed, "wrong-key"))
    assert info.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(keyed, "wrong-key").models.list()
    good = client(keyed, API_KEY)
    resp = chat(good, max_tokens=3)
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 3
    assert [m.id for m in good.models.list().data] == [MODEL_ID]

    with pytest.raises(HfHubHTTPError) as hf_info:
        InferenceClient(keyed, api_key="wrong-key", timeout=60).chat_completion(MESSAGES, max_tokens=2)
    assert hf_info.value.response.status_code == 401
    hf = InferenceClient(keyed, api_key=API_KEY, timeout=60)
    assert hf.chat_completion(MESSAGES, max_tokens=2).usage.completion_tokens == 2


def test_without_max_tokens_a_choice_fills_max_total_tokens(keyed, fast_tokenizer):
    """TGI 3: no max_tokens means whatever --max-total-tokens leaves after the prompt (64 on `keyed`)."""
    prompt = PROMPTS[0]
    resp = client(keyed, API_KEY).completions.create(model=MODEL_ID, prompt=prompt, temperature=0)
    prompt_tokens = len(fast_tokenizer.encode(prompt).ids)
    assert resp.choices[0].finish_reason == "length"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt_tokens, KEYED_MAX_TOTAL - prompt_tokens)
    with pytest.raises(openai.BadRequestError):
        client(keyed, API_KEY).completions.create(model=MODEL_ID, prompt=prompt, max_tokens=KEYED_MAX_TOTAL)


def test_queue_full_raises_rate_limit(idle_url, stack):
    conn = redis.Redis.from_url(stack.redis_url)
    first: list[BaseException] = []

    def waiting_request() -> None:
        try:
            chat(client(idle_url))
        except BaseException as exc:  # noqa: BLE001 - recorded for the main thread
            first.append(exc)

    thread = threading.Thread(target=waiting_request)
    thread.start()
    try:
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while conn.llen("rq:queue:" + queue_name(IDLE_ID)) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert conn.llen("rq:queue:" + queue_name(IDLE_ID)) == 1
        with pytest.raises(openai.RateLimitError) as info:
            chat(client(idle_url))
        assert info.value.status_code == 429
        assert info.value.body["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            client(idle_url).completions.create(model=IDLE_ID, prompt="hi", max_tokens=2, stream=True)
    finally:
        thread.join(IDLE_TIMEOUT_S + 30)
    # nobody took the first job: it ends with the server error of an incomplete generation
    assert len(first) == 1 and isinstance(first[0], openai.InternalServerError), first


def test_more_choices_than_the_queue_holds_is_a_bad_request(idle_url):
    with pytest.raises(openai.BadRequestError) as caught:  # never admissible: no 429 for the SDK to retry
        chat(client(idle_url), n=2, temperature=1.0)  # two jobs > --max-queue-length 1
    assert caught.value.body["param"] == "n"


# --- mid-stream failures --------------------------------------------------------------------------

def test_mid_stream_failure_is_an_error_event_then_done(idle_url):
    body = {"model": IDLE_ID, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    resp = requests.post(idle_url + "/v1/chat/completions", json=body, stream=True, timeout=60)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    raw = b"".join(resp.iter_content(chunk_size=None))
    frames = [f for f in raw.split(b"\n\n") if f and not f.startswith(b":")]
    assert raw.endswith(b"\n\n")
    assert len(frames) == 2, raw
    assert frames[0].startswith(b"data: {"), raw
    error = orjson.loads(frames[0][len(b"data: "):])["error"]
    assert error["type"] == "server_error" and error["message"]
    assert frames[1] == b"data: [DONE]"


def test_mid_stream_failure_raises_in_the_openai_client(idle_url):
    with pytest.raises(openai.APIError) as info:
        for _ in client(idle_url).chat.completions.create(model=IDLE_ID, messages=MESSAGES, max_tokens=4,
                                                          stream=True):
            pass
    assert info.value.body["type"] == "server_error"


def test_mid_stream_failure_raises_in_huggingface_hub(idle_url):
    hf = InferenceClient(idle_url, timeout=60)  # kept referenced: collecting the client closes its streams
    with pytest.raises(TextGenerationError) as info:  # an event holding `error`: raised, not parsed as a chunk
        for _ in hf.chat_completion(MESSAGES, max_tokens=4, stream=True):
            pass
    assert info.value.args[0]["type"] == "server_error"


# --- logprobs and n -----------------------------------------------------------------------------

def test_logprobs_with_top_alternatives(oai):
    resp = chat(oai, max_tokens=5, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    for t in content:
        assert t.bytes == list(t.token.encode())
        assert t.logprob <= 0
        assert len(t.top_logprobs) == 3, t
        # greedy: the chosen token is the most likely one, and the alternatives come best first
        assert t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-4)
        lps = [a.logprob for a in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)

    none = chat(oai, max_tokens=3, logprobs=True, top_logprobs=0).choices[0].logprobs.content
    assert len(none) == 3 and all(t.top_logprobs == [] for t in none)
    assert chat(oai, max_tokens=3, logprobs=False).choices[0].logprobs is None

    chunks = list(chat(oai, max_tokens=5, logprobs=True, top_logprobs=3, stream=True))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [len(t.top_logprobs) for t in streamed] == [3] * 5


def test_completions_logprobs(oai):
    resp = complete(oai, PROMPTS[0], logprobs=2)
    text = resp.choices[0].text
    lp = resp.choices[0].logprobs
    assert "".join(lp.tokens) == text and len(lp.tokens) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2, top
        assert max(top, key=top.get) == token  # greedy: the chosen token is the best alternative
        assert top[token] == pytest.approx(logprob, abs=1e-4)

    streamed = [c.choices[0].logprobs for c in complete(oai, PROMPTS[0], logprobs=2, stream=True)]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_penalties_change_greedy_output(oai, penalty):
    """The tiny model's greedy text repeats one token; a penalty of 2 (logit margins here are ~0.15)
    keeps any generated token from being picked again."""
    def tokens(**kw):
        resp = chat(oai, max_tokens=6, logprobs=True, top_logprobs=0, **kw)
        return [t.token for t in resp.choices[0].logprobs.content]

    plain = tokens()
    assert len(set(plain)) < len(plain)
    penalised = tokens(**{penalty: 2.0})
    assert len(penalised) == 6 and len(set(penalised)) == 6, penalised
    assert tokens(**{penalty: 0.0}) == plain


def test_n_choices_with_a_seed_repeat(oai):
    kw = {"n": 2, "seed": 42, "temperature": 1.0, "max_tokens": 8}
    first = chat(oai, **kw)
    assert [c.index for c in first.choices] == [0, 1]
    texts = [c.message.content for c in first.choices]
    assert texts[0] != texts[1]  # choice i samples with seed + i
    assert first.usage.completion_tokens == sum(8 for _ in texts)
    again = chat(oai, **kw)
    assert [c.message.content for c in again.choices] == texts
    # choice 1 is what a single request with seed 43 gives
    assert chat(oai, **{**kw, "n": 1, "seed": 43}).choices[0].message.content == texts[1]

    streamed = ["", ""]
    for chunk in chat(oai, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == texts


# --- huggingface_hub -------------------------------------------------------------------------------

def test_huggingface_hub_chat_completion(stack, oai):
    hf = InferenceClient(stack.url, timeout=60)
    out = hf.chat_completion(MESSAGES, max_tokens=8, temperature=0)
    content = out.choices[0].message.content
    assert content == chat(oai).choices[0].message.content
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8
    pieces = [c.choices[0].delta.content or "" for c in hf.chat_completion(MESSAGES, max_tokens=8, temperature=0,
                                                                             stream=True)]
    assert "".join(pieces) == content


def test_huggingface_hub_endpoint_info(stack):
    # huggingface_hub 2.x reads /info only for its "hf-inference" provider (a URL alone leaves it unset)
    info = InferenceClient(stack.url, provider="hf-inference", timeout=60).get_endpoint_info()
    assert info == requests.get(stack.url + "/info", timeout=30).json()
    assert info["model_id"] == MODEL_ID
    assert info["max_total_tokens"] == 1512 and info["max_input_tokens"] == 1000
    assert info["max_best_of"] == 2 and info["max_stop_sequences"] == 4
    assert info["max_concurrent_requests"] == 128


def test_redis_down_and_a_body_too_large_raise_the_sdks_classes(tiny_model_dir):
    """503 (Redis unreachable) is an InternalServerError, 413 an APIStatusError with that status."""
    api, url = start_api("redis://127.0.0.1:1/0", tiny_model_dir, "--model-id", MODEL_ID, "--max-body-bytes", "300")
    try:
        wait_http(url, [api])  # /metrics answers without Redis (its Redis families left out)
        with pytest.raises(openai.InternalServerError) as down:
            chat(client(url), max_tokens=2)
        assert down.value.status_code == 503 and down.value.body["code"] == "service_unavailable"
        with pytest.raises(openai.APIStatusError) as large:
            client(url).chat.completions.create(model=MODEL_ID, max_tokens=2,
                                                messages=[{"role": "user", "content": "x" * 400}])
        assert large.value.status_code == 413 and large.value.body["code"] == "request_too_large"
    finally:
        api.stop()
