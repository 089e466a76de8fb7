"""Two different models behind one API (`--model A --model-id a --model B --model-id b`), one worker each.

A is the shared tiny random Llama; B is built here with another torch seed, untied embeddings, wider
weights and its own chat template (no default system prompt). What each should answer is computed
in-process with transformers on its directory (greedy, fp32), so a request that reached the wrong
queue, or was templated or tokenized with the other model's files, shows as different text.
"""
from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import openai
import pytest
import redis
import requests
from huggingface_hub import InferenceClient

from tests.support.processes import TgqProcess, start_api, start_worker, wait_http, wait_worker_ready
from tests.support.redis_server import free_port

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Name a colour."}]
PROMPT = "The capital of France is"
MAX_TOKENS = 8
B_SEED = 4321
B_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
REQUEST_TIMEOUT_S = 3


def build_model_b(path: Path, tokenizer_dir: str) -> Path:
    """A second tiny Llama, unlike A: seed, untied embeddings, initializer_range 0.1 (greedy margins
    of a few hundredths, far above fp32 noise) and a chat template without a system prompt."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = B_TEMPLATE
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         initializer_range=0.1, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(B_SEED)
    LlamaForCausalLM(config).to(torch.float32).eval().save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def greedy(model_dir: str) -> dict[str, str]:
    """transformers' greedy texts for the chat MESSAGES and the completion PROMPT, with the templated chat text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    templated = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    out = {"templated": templated}
    for name, ids in (("chat", tok(templated, add_special_tokens=False, return_tensors="pt").input_ids),
                      ("completion", tok(PROMPT, return_tensors="pt").input_ids)):
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                 do_sample=False)
        out[name] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    return out


@pytest.fixture(scope="module")
def model_b(tmp_path_factory, tiny_model_dir) -> str:
    return str(build_model_b(tmp_path_factory.mktemp("model-b") / "model", tiny_model_dir))


@pytest.fixture(scope="module")
def expected(tiny_model_dir, model_b) -> dict[str, dict[str, str]]:
    exp = {"a": greedy(tiny_model_dir), "b": greedy(model_b)}
    assert exp["a"]["templated"] != exp["b"]["templated"]
    assert exp["a"]["chat"] != exp["b"]["chat"] and exp["a"]["completion"] != exp["b"]["completion"]
    return exp


class Multi:
    def __init__(self, url: str, redis_url: str, workers: dict[str, TgqProcess]) -> None:
        self.url, self.redis_url, self.workers = url, redis_url, workers

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def multi(redis_server, tiny_model_dir, model_b):
    redis.Redis.from_url(redis_server.url).flushall()
    api, url = start_api(redis_server.url, tiny_model_dir, "--model-id", "a", "--model", model_b, "--model-id", "b",
                         "--request-timeout", str(REQUEST_TIMEOUT_S))
    workers = {"a": start_worker(redis_server.url, tiny_model_dir, "--model-id", "a"),
               "b": start_worker(redis_server.url, model_b, "--model-id", "b")}
    try:
        wait_worker_ready(redis.Redis.from_url(redis_server.url), list(workers.values()))
        wait_http(url, [api])
        yield Multi(url, redis_server.url, workers)
    finally:
        api.stop()
        for w in workers.values():
            w.stop(40)


def ask_chat(oai: openai.OpenAI, model: str, **kw) -> str:
    resp = oai.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS, **kw)
    if kw.get("stream"):
        return "".join(c.choices[0].delta.content or "" for c in resp if c.choices)
    assert resp.model == model
    return resp.choices[0].message.content


def ask_completion(oai: openai.OpenAI, model: str) -> str:
    resp = oai.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=MAX_TOKENS)
    assert resp.model == model
    return resp.choices[0].text


def test_each_model_answers_from_its_own_weights(multi, expected):
    oai = multi.client()
    for model in ("a", "b"):
        assert ask_chat(oai, model) == expected[model]["chat"], model
        assert ask_chat(oai, model, stream=True) == expected[model]["chat"], model
        assert ask_completion(oai, model) == expected[model]["completion"], model


def test_each_model_uses_its_own_chat_template(multi, expected, tiny_model_dir, model_b):
    from tokenizers import Tokenizer

    for model, directory in (("a", tiny_model_dir), ("b", model_b)):
        resp = requests.post(multi.url + "/chat_tokenize", json={"model": model, "messages": MESSAGES}, timeout=30)
        assert resp.status_code == 200, resp.text
        assert resp.json()["templated_text"] == expected[model]["templated"]
        ids = Tokenizer.from_file(str(Path(directory) / "tokenizer.json")).encode(
            expected[model]["templated"], add_special_tokens=False).ids
        assert [t["id"] for t in resp.json()["tokenize_response"]] == ids
        usage = multi.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=2).usage
        assert usage.prompt_tokens == len(ids)


def test_default_names_and_tgi_routes_go_to_the_first_model(multi, expected):
    oai = multi.client()
    for name in ("tgi", "dummy"):
        resp = oai.chat.completions.create(model=name, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS)
        assert resp.choices[0].message.content == expected["a"]["chat"], name
        assert resp.model == "a"
    raw = requests.post(multi.url + "/v1/chat/completions", timeout=60, json={
        "messages": MESSAGES, "temperature": 0, "max_tokens": MAX_TOKENS})  # no `model` at all
    assert raw.status_code == 200, raw.text
    assert raw.json()["choices"][0]["message"]["content"] == expected["a"]["chat"]
    assert raw.json()["model"] == "a"
    hf = InferenceClient(multi.url, timeout=60)  # huggingface_hub sends "model": "dummy"
    assert hf.chat_completion(MESSAGES, max_tokens=MAX_TOKENS, temperature=0).choices[0].message.content == \
        expected["a"]["chat"]
    gen = requests.post(multi.url + "/generate", timeout=60, json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": MAX_TOKENS}})
    assert gen.status_code == 200, gen.text
    assert gen.json()["generated_text"] == expected["a"]["completion"]
    assert requests.get(multi.url + "/info", timeout=30).json()["model_id"] == "a"


def test_unknown_model_is_404_listing_both(multi):
    oai = multi.client()
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="c", messages=MESSAGES, max_tokens=2)
    assert info.value.status_code == 404
    assert info.value.body["code"] == "model_not_found"
    assert "`c`" in info.value.message and re.search(r"\ba\b.*\bb\b", info.value.body["message"])
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="c", messages=MESSAGES, max_tokens=2, stream=True)
    resp = requests.post(multi.url + "/chat_tokenize", json={"model": "c", "messages": MESSAGES}, timeout=30)
    assert resp.status_code == 404


def test_models_list_both_with_a_worker_each(multi):
    data = multi.client().models.list().data
    assert [m.id for m in data] == ["a", "b"]
    assert [m.model_extra["workers"] for m in data] == [1, 1]
    assert all(m.object == "model" and m.owned_by == "tgq" for m in data)


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} missing from /metrics:\n{text}"
    return float(match.group(1))


def test_per_model_queue_gauges(multi):
    """Last in the module: stops B's worker so that a request for b waits in b's queue."""
    text = requests.get(multi.url + "/metrics", timeout=30).text
    assert metric(text, "tgi_queue_size") == 0
    assert metric(text, 'tgq_model_queue_size{model="a"}') == 0
    assert metric(text, 'tgq_model_queue_size{model="b"}') == 0

    multi.workers["b"].stop(40)
    data = multi.client().models.list().data
    assert [m.model_extra["workers"] for m in data] == [1, 0]
    errors: list[BaseException] = []

    def waiting() -> None:
        try:
            multi.client().chat.completions.create(model="b", messages=MESSAGES, max_tokens=2)
        except BaseException as exc:  # noqa: BLE001 - recorded for the main thread
            errors.append(exc)

    thread = threading.Thread(target=waiting)
    thread.start()
    try:
        conn = redis.Redis.from_url(multi.redis_url)
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while conn.llen("rq:queue:tgq:b") == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        text = requests.get(multi.url + "/metrics", timeout=30).text
        assert metric(text, 'tgq_model_queue_size{model="b"}') == 1
        assert metric(text, 'tgq_model_queue_size{model="a"}') == 0
        assert metric(text, "tgi_queue_size") == 0  # TGI's gauge is the first model's queue
        assert ask_chat(multi.client(), "a") == ask_chat(multi.client(), "a")  # a still answers
    finally:
        thread.join(REQUEST_TIMEOUT_S + 30)
    assert len(errors) == 1 and isinstance(errors[0], openai.InternalServerError), errors


# --- tgq serve ------------------------------------------------------------------------------------

def test_serve_starts_one_worker_per_model(tiny_model_dir, model_b, expected, tmp_path):
    port = free_port()
    proc = TgqProcess(["serve", "--model", tiny_model_dir, "--model-id", "a", "--model", model_b, "--model-id", "b",
                       "--port", str(port), "--host", "127.0.0.1", "--dtype", "fp32", "--threads", "1",
                       "--workers", "1", "--cache-dir", str(tmp_path)], env={"TGQ_REDIS_URL": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url, [proc], path="/health", timeout=180)
        oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        deadline = time.monotonic() + 120
        while [m.model_extra["workers"] for m in oai.models.list().data] != [1, 1]:
            assert time.monotonic() < deadline, oai.models.list()
            assert proc.alive(), proc.output()[-3000:]
            time.sleep(0.2)
        for model in ("a", "b"):
            assert ask_chat(oai, model) == expected[model]["chat"], model
            assert ask_completion(oai, model) == expected[model]["completion"], model
        proc.send(signal.SIGTERM)
        assert proc.proc.wait(60) == 0
    finally:
        proc.stop()
        assert "serving" in proc.output(), proc.output()[-3000:]
