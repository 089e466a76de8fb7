"""`GET /playground` in a real headless Chromium.

Against the tiny-model stack: the model picker lists what `GET /v1/models` serves, a message streams
a reply into the conversation with a tokens/s readout (the same text the route streams to any
client), the next turn sends the conversation again, Stop aborts the fetch (and the server drops the
job), a rejected request shows its error, and the API key field works with `--api-key`. Against a
scripted server: the page's SSE reader copes with events split anywhere (inside a line, inside a
UTF-8 character), keep-alive comments, CRLF lines, errors mid-stream and streams cut short.
"""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from tests.integration.faults import rq_queue, wait_for

from .conftest import MODEL_ID, make_stack, save_screenshot

pytestmark = pytest.mark.integration

PAGE_FILE = Path(__file__).resolve().parents[2] / "api" / "static" / "playground.html"
TPS = re.compile(r"(\d+(?:\.\d+)?) tokens/s")

# Wraps window.fetch to keep what the page sends (URL, parsed JSON body, headers), in order.
RECORD_FETCH = """
window.__sent = [];
const original = window.fetch;
window.fetch = function (url, init) {
  if (init && typeof init.body === "string") {
    window.__sent.push({url: String(url), body: JSON.parse(init.body), headers: init.headers || {}});
  }
  return original.apply(this, arguments);
};
"""

READ_MESSAGES = """
return Array.from(document.querySelectorAll("#messages .msg")).map((m) => ({
  role: m.classList.contains("user") ? "user" : "assistant",
  text: m.querySelector(".content").textContent,
  meta: m.querySelector(".meta").textContent,
  state: m.dataset.state || "",
  dropped: m.classList.contains("dropped"),
}));
"""


class Playground:
    """The page in the browser, by its element ids."""

    def __init__(self, driver, base_url: str) -> None:
        self.driver = driver
        self.base_url = base_url

    def open(self) -> "Playground":
        self.driver.get(self.base_url + "/playground")
        self.wait(lambda: self.status_state() != "loading", 30, "the model list to load")
        return self

    def wait(self, predicate, timeout: float, what: str):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(lambda _: predicate(), what)

    def el(self, element_id: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, element_id)

    def text(self, element_id: str) -> str:
        return self.el(element_id).get_property("textContent")

    def status_state(self) -> str:
        return self.el("status").get_attribute("data-state")

    def fill(self, element_id: str, value: object) -> None:
        field = self.el(element_id)
        field.clear()
        field.send_keys(str(value))

    def model_options(self) -> list[tuple[str, str]]:
        return self.driver.execute_script(
            'return Array.from(document.querySelectorAll("#model option")).map((o) => [o.value, o.textContent]);')

    def model_info(self) -> list[str]:
        return self.driver.execute_script(
            'return Array.from(document.querySelectorAll("#model-info li")).map((li) => li.textContent);')

    def select_model(self, model_id: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.el("model")).select_by_value(model_id)

    def record_requests(self) -> None:
        self.driver.execute_script(RECORD_FETCH)

    def sent(self) -> list[dict]:
        return self.driver.execute_script("return window.__sent;")

    def messages(self) -> list[dict]:
        return self.driver.execute_script(READ_MESSAGES)

    def replies(self) -> list[dict]:
        return [m for m in self.messages() if m["role"] == "assistant"]

    def send(self, text: str) -> None:
        self.fill("message", text)
        self.el("send").click()

    def wait_reply(self, count: int, timeout: float = 60) -> dict:
        """Wait until the `count`-th reply has ended (done, stopped or error) and return it."""
        def ended():
            replies = self.replies()
            return len(replies) >= count and replies[count - 1]["state"] not in ("", "streaming")

        self.wait(ended, timeout, f"reply {count} to end")
        return self.replies()[count - 1]

    def console_problems(self) -> list[str]:
        """Console entries at WARNING or above since the last call (reading the log empties it)."""
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] in ("WARNING", "SEVERE")]

    def tokens_per_second(self) -> float:
        match = TPS.fullmatch(self.text("tps"))
        assert match, f"#tps shows {self.text('tps')!r}"
        return float(match.group(1))


def reply_tokens(meta: str) -> int:
    match = re.match(r"(\d+) tokens?\b", meta)
    assert match, meta
    return int(match.group(1))


def stream_chat(url: str, body: dict) -> str:
    """POST the same body with requests and concatenate the streamed `delta.content`s."""
    resp = requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=60)
    assert resp.status_code == 200, resp.text
    raw = b"".join(resp.iter_content(chunk_size=None)).decode()
    text = ""
    for frame in raw.split("\n\n"):
        data = "\n".join(line[5:].lstrip(" ") for line in frame.split("\n") if line.startswith("data:"))
        if not data or data == "[DONE]":
            continue
        chunk = json.loads(data)
        assert "error" not in chunk, chunk
        for choice in chunk["choices"]:
            text += choice["delta"].get("content") or ""
    return text


# ---- against the tiny-model stack ---------------------------------------------------------------


def test_a_message_streams_a_reply_with_its_rate_and_the_next_turn_sends_the_conversation(stack, browser, tmp_path):
    listed = requests.get(stack.url + "/v1/models", timeout=10).json()
    served = {m["id"]: m for m in listed["data"]}
    assert MODEL_ID in served, listed

    page = Playground(browser, stack.url).open()
    assert page.text("error") == ""
    options = page.model_options()
    assert [value for value, _ in options] == [m["id"] for m in listed["data"]]
    page.select_model(MODEL_ID)
    label = dict(options)[MODEL_ID]
    if "workers" in served[MODEL_ID]:  # tgq's own live count, shown next to the id and in the details
        workers = served[MODEL_ID]["workers"]
        assert str(workers) in label and "worker" in label, label
        assert f"workers: {workers}" in page.model_info()

    page.fill("system", "You are a terse assistant.")
    page.fill("temperature", "0.8")
    page.fill("max-tokens", "20")
    page.fill("seed", "1234")  # seeded sampling in fp32: the same text for any client
    page.record_requests()
    page.send("Hello there")
    first = page.wait_reply(1)
    assert first["state"] == "done", (first, page.text("error"))
    assert first["text"].strip(), first
    assert page.text("error") == ""
    assert page.tokens_per_second() > 0
    assert 1 <= reply_tokens(first["meta"]) <= 20, first["meta"]
    assert page.text("status").startswith("done")
    save_screenshot(browser, tmp_path, "playground.png")

    [request] = page.sent()[-1:]
    assert request["url"].endswith("/v1/chat/completions")
    body = request["body"]
    assert body["model"] == MODEL_ID and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.8 and body["max_tokens"] == 20 and body["seed"] == 1234
    assert body["messages"] == [{"role": "system", "content": "You are a terse assistant."},
                                {"role": "user", "content": "Hello there"}]
    # the page shows exactly the text the route streams (the same seed gives the same text)
    assert stream_chat(stack.url, body) == first["text"]

    page.send("And then?")
    second = page.wait_reply(2)
    assert second["state"] == "done" and second["text"], (second, page.text("error"))
    assert page.sent()[-1]["body"]["messages"] == [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first["text"]},
        {"role": "user", "content": "And then?"},
    ]
    assert [m["role"] for m in page.messages()] == ["user", "assistant", "user", "assistant"]
    # offline: everything the page loaded came from the API itself, and its console stayed clean (the
    # page's Content-Security-Policy allows nothing else, and a blocked inline block would be logged)
    policy = requests.get(stack.url + "/playground", timeout=10).headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy, policy
    loaded = browser.execute_script(
        'return [location.href, ...performance.getEntriesByType("resource").map((e) => e.name)];')
    assert all(url.startswith(stack.url + "/") for url in loaded), loaded
    assert page.console_problems() == []


def test_a_json_schema_reply_and_a_tool_call_are_shown(stack, browser, tmp_path):
    """The Output picker sends response_format (the reply is JSON under the schema); the Tools box sends
    tools and tool_choice, and the reply shows the assembled call, which the next turn sends back."""
    from selenium.webdriver.support.ui import Select

    page = Playground(browser, stack.url).open()
    page.select_model(MODEL_ID)
    page.fill("max-tokens", "60")
    page.fill("temperature", "0")
    Select(page.el("output")).select_by_value("json_schema")
    assert page.el("schema").is_displayed()
    schema = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 6}}, "required": ["word"],
              "additionalProperties": False}
    page.fill("schema", json.dumps(schema))
    page.record_requests()
    page.send("Give me a word")
    reply = page.wait_reply(1)
    assert reply["state"] == "done", (reply, page.text("error"))
    assert set(json.loads(reply["text"])) == {"word"}
    assert page.sent()[-1]["body"]["response_format"] == {"type": "json_schema",
                                                          "json_schema": {"name": "playground", "schema": schema}}

    Select(page.el("output")).select_by_value("text")
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"term": {"type": "string", "maxLength": 8}}, "required": ["term"],
        "additionalProperties": False}}}]
    page.fill("tools", json.dumps(tools))
    Select(page.el("tool-choice")).select_by_value("required")
    page.el("parallel").click()  # one call: the random model could list calls past max tokens
    page.send("Look something up")
    reply = page.wait_reply(2)
    assert reply["state"] == "done" and "finish: tool_calls" in reply["meta"], (reply, page.text("error"))
    calls = browser.execute_script(
        'return Array.from(document.querySelectorAll("#messages .msg.assistant .tool-call")).map((c) => c.textContent);')
    assert len(calls) == 1 and calls[0].startswith("\u2192 lookup({")
    assert json.loads(calls[0][len("\u2192 lookup("):-1])["term"] is not None
    sent = page.sent()[-1]["body"]
    assert sent["tools"] == tools and sent["tool_choice"] == "required" and "response_format" not in sent
    assert sent["parallel_tool_calls"] is False
    save_screenshot(browser, tmp_path, "playground-tools.png")

    Select(page.el("tool-choice")).select_by_value("none")
    page.send("Thanks")
    assert page.wait_reply(3)["state"] == "done", page.text("error")
    history = page.sent()[-1]["body"]["messages"]
    assert history[3]["role"] == "assistant" and history[3]["content"] is None
    assert history[3]["tool_calls"][0]["function"]["name"] == "lookup"
    assert page.console_problems() == []


def test_stop_aborts_the_stream_and_the_server_drops_the_job(stack, browser, tmp_path):
    client = stack.redis
    registry = rq_queue(client).canceled_job_registry
    cancelled_before = set(registry.get_job_ids())

    page = Playground(browser, stack.url).open()
    page.select_model(MODEL_ID)
    page.fill("max-tokens", "1400")  # ~3.5 s for the tiny model: plenty of time to press Stop
    page.send("Tell me a very long story")
    page.wait(lambda: (r := page.replies()) and r[0]["state"] == "streaming" and r[0]["text"], 30,
              "streamed text while the reply is still streaming")
    assert page.el("stop").is_enabled() and not page.el("send").is_enabled()
    page.el("stop").click()

    reply = page.wait_reply(1, timeout=10)
    assert reply["state"] == "stopped", reply
    assert page.status_state() == "stopped"
    assert page.el("send").is_enabled() and not page.el("stop").is_enabled()
    assert "stopped" in reply["meta"]
    assert page.text("error") == ""
    assert 1 <= reply_tokens(reply["meta"]) < 1400, reply["meta"]
    time.sleep(0.5)
    assert page.replies()[0]["text"] == reply["text"], "text kept arriving after Stop"
    save_screenshot(browser, tmp_path, "playground-stopped.png")

    # the request ended on the server too: the API saw the client leave and the worker dropped the row
    wait_for(lambda: set(registry.get_job_ids()) - cancelled_before, 20, "the stopped job in RQ's canceled registry")
    metrics = requests.get(stack.url + "/metrics", timeout=10).text
    assert re.search(r'^tgi_request_failure(_total)?\{err="dropped"\} [1-9]', metrics, re.M), metrics

    # the stopped partial reply stays in the conversation for the next turn
    page.record_requests()
    page.fill("max-tokens", "5")
    page.send("Short, please")
    assert page.wait_reply(2)["state"] == "done", page.text("error")
    messages = page.sent()[-1]["body"]["messages"]
    assert messages == [{"role": "user", "content": "Tell me a very long story"},
                        {"role": "assistant", "content": reply["text"]},
                        {"role": "user", "content": "Short, please"}]


def test_a_rejected_request_shows_the_servers_error(stack, browser):
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000,
            "stream": True}
    direct = requests.post(stack.url + "/v1/chat/completions", json=body, timeout=30)
    assert 400 <= direct.status_code < 500, direct.text
    message = direct.json()["error"]["message"]

    page = Playground(browser, stack.url).open()
    page.select_model(MODEL_ID)
    page.fill("max-tokens", "100000")
    page.send("hi")
    reply = page.wait_reply(1)
    assert reply["state"] == "error"
    error = page.text("error")
    assert error.startswith(f"HTTP {direct.status_code}") and message in error, error
    assert page.status_state() == "error"
    # nothing came back: the turn is left out of the conversation and its text offered again
    assert all(m["dropped"] for m in page.messages())
    assert page.el("message").get_property("value") == "hi"


def test_the_api_key_is_sent_as_a_bearer_token(stack, browser):
    # a second API with --api-key in front of the module's worker (same Redis, same queue)
    guarded = make_stack(stack.redis_url, stack.model, workers=0, api_args=("--api-key", "sk-playground"))
    try:
        page = Playground(browser, guarded.url).open()
        error = page.text("error")
        assert error.startswith("Could not list the models (GET /v1/models): HTTP 401"), error
        assert page.model_options() == []

        page.fill("api-key", "sk-playground")
        page.el("system").click()  # leaving the field reloads the models with the key
        page.wait(lambda: [v for v, _ in page.model_options()] == [MODEL_ID], 10, "the models listed with the key")
        assert page.text("error") == ""
        page.fill("max-tokens", "5")
        page.send("Hi")
        reply = page.wait_reply(1)
        assert reply["state"] == "done" and reply["text"], (reply, page.text("error"))

        page.fill("api-key", "wrong")
        page.send("Again")
        reply = page.wait_reply(2)
        assert reply["state"] == "error" and page.text("error").startswith("HTTP 401"), page.text("error")
    finally:
        guarded.stop()


# ---- against a scripted server: the SSE reader's edge cases -------------------------------------


def sse(obj: object) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def chunk(content: str | None = None, role: str | None = None, finish: str | None = None) -> dict:
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "scripted",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


SPLIT_PIECES = ["Héllo", " wörld ", "日本語 ", "🙂", "\n", "line2"]
SCRIPTS = {
    # every event of a normal stream, written a few bytes at a time (lines and UTF-8 characters cut)
    "split": b"".join([
        b": keep-alive\n\n", sse(chunk("", role="assistant")),
        *[sse(chunk(p)) for p in SPLIT_PIECES[:-1]],
        sse(chunk(SPLIT_PIECES[-1], finish="length")).replace(b"\n", b"\r\n"),
        sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "scripted",
             "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}}),
        sse("[DONE]"),
    ]),
    "fail-mid": b"".join([
        sse(chunk("", role="assistant")), sse(chunk("partial")),
        sse({"error": {"message": "Request failed during generation: boom", "type": "generation",
                       "param": None, "code": None}}),
        sse("[DONE]"),
    ]),
    "cut-short": sse(chunk("", role="assistant")) + sse(chunk("half")),
}


class ScriptedServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.seen: list[dict] = []  # every request: path, Authorization, JSON body

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ScriptedHandler(BaseHTTPRequestHandler):
    server: ScriptedServer

    def log_message(self, *args) -> None:
        pass

    def reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.server.seen.append({"path": self.path, "auth": self.headers.get("Authorization")})
        if self.path == "/playground":
            self.reply(200, "text/html; charset=utf-8", PAGE_FILE.read_bytes())
        elif self.path == "/v1/models":
            models = {"object": "list", "data": [{"id": "scripted", "object": "model", "created": 0,
                                                  "owned_by": "tgq", "workers": 2}]}
            self.reply(200, "application/json", json.dumps(models).encode())
        else:
            self.reply(404, "text/plain", b"not found")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        script = body["messages"][-1]["content"]
        if script not in SCRIPTS:
            error = {"error": {"message": f"no script {script!r}", "type": "invalid_request_error",
                               "param": "messages", "code": None}}
            self.reply(422, "application/json", json.dumps(error).encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for piece in awkward_pieces(SCRIPTS[script]):
            self.wfile.write(piece)
            self.wfile.flush()
            time.sleep(0.03)  # long enough for the browser to hand each piece to a separate read()
        self.close_connection = True


def awkward_pieces(data: bytes) -> list[bytes]:
    """Cut after the first byte of every multi-byte UTF-8 character, inside every `data:`, between
    the two newlines that end an event and between every CR and its LF."""
    cuts = set()
    for i in range(1, len(data)):
        if 0x80 <= data[i] < 0xC0 and data[i - 1] >= 0xC0:
            cuts.add(i)
        if data[i - 1:i + 1] in (b"\r\n", b"\n\n"):
            cuts.add(i)
        if data[i:i + 5] == b"data:":
            cuts.add(i + 3)
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.fixture
def scripted():
    server = ScriptedServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_the_stream_reader_handles_split_events_errors_and_cut_streams(scripted, browser):
    page = Playground(browser, scripted.url).open()
    assert page.model_options() == [["scripted", "scripted \u2014 2 workers"]]
    assert "workers: 2" in page.model_info()
    page.fill("api-key", "sk-test")
    page.el("temperature").click()  # the key field's change event reloads the models with the key
    page.wait(lambda: any(s["path"] == "/v1/models" and s["auth"] == "Bearer sk-test" for s in scripted.seen),
              10, "the models reloaded with the API key")

    page.send("split")
    reply = page.wait_reply(1)
    assert reply["state"] == "done", page.text("error")
    assert reply["text"] == "".join(SPLIT_PIECES)
    # the usage chunk's count (8), not the number of content chunks (6)
    assert reply["meta"].startswith("8 tokens ·"), reply["meta"]
    assert "3 prompt tokens" in reply["meta"] and "finish: length" in reply["meta"], reply["meta"]
    assert page.tokens_per_second() > 0
    assert page.text("error") == ""
    assert scripted.seen[-1]["auth"] == "Bearer sk-test"

    page.send("fail-mid")
    reply = page.wait_reply(2)
    assert reply["state"] == "error" and reply["text"] == "partial"
    assert page.text("error") == "Request failed during generation: boom (type: generation)"

    page.send("cut-short")
    reply = page.wait_reply(3)
    assert reply["state"] == "error" and reply["text"] == "half"
    assert page.text("error") == "The stream ended before data: [DONE]."

    page.send("unknown")
    reply = page.wait_reply(4)
    assert reply["state"] == "error" and reply["text"] == ""
    assert page.text("error") == ("HTTP 422 Unprocessable Entity: no script 'unknown' "
                                  "(type: invalid_request_error, param: messages)")
    assert page.el("message").get_property("value") == "unknown"

    page.send("split")
    assert page.wait_reply(5)["state"] == "done"
    # partial replies stay in the conversation; the turn that got nothing back does not
    assert scripted.seen[-1]["body"]["messages"] == [
        {"role": "user", "content": "split"}, {"role": "assistant", "content": "".join(SPLIT_PIECES)},
        {"role": "user", "content": "fail-mid"}, {"role": "assistant", "content": "partial"},
        {"role": "user", "content": "cut-short"}, {"role": "assistant", "content": "half"},
        {"role": "user", "content": "split"},
    ]
