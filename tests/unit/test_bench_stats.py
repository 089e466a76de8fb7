"""The benchmark's pure helpers: percentiles, SSE decoding, Prometheus text, prompt building."""
from __future__ import annotations

import json
import math

import pytest

from bench import stats
from bench.client import RequestResult, make_payload, make_prompt, summarize_run


def test_percentile_interpolates_like_numpy():
    data = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert stats.percentile(data, 50) == pytest.approx(5.5)
    assert stats.percentile(data, 95) == pytest.approx(9.55)
    assert stats.percentile(data, 0) == 1
    assert stats.percentile(data, 100) == 10
    assert stats.percentile([3, 1, 2], 50) == 2  # order does not matter


def test_percentile_edges():
    assert stats.percentile([], 50) is None
    assert stats.percentile([4.2], 95) == 4.2
    with pytest.raises(ValueError):
        stats.percentile([1], 101)


def test_median_skips_missing_values():
    assert stats.median([3.0, None, 1.0, 2.0]) == 2.0
    assert stats.median([None, None]) is None


def test_summarize_and_gaps():
    s = stats.summarize([0.1, 0.2, 0.3])
    assert s["count"] == 3 and s["mean"] == pytest.approx(0.2) and s["max"] == 0.3
    assert stats.summarize([])["p50"] is None
    assert stats.gaps([1.0, 1.5, 3.0]) == pytest.approx([0.5, 1.5])
    assert stats.gaps([1.0]) == []


def test_sse_decoder_tgi_framing():
    # TGI: `data:` with no space, compact JSON, blank line; keep-alive comment frames in between.
    raw = [b'data:{"token":{"id":1,"text":"a"}}\n', b"\n", b":\n", b"\n",
           b'data:{"token":{"id":2,"text":"b"},"generated_text":"ab"}\n', b"\n"]
    assert stats.parse_sse_lines(raw) == ['{"token":{"id":1,"text":"a"}}',
                                          '{"token":{"id":2,"text":"b"},"generated_text":"ab"}']


def test_sse_decoder_space_crlf_multiline_and_other_fields():
    dec = stats.SseDecoder()
    assert dec.feed_line("event: message\r\n") is None
    assert dec.feed_line("data: one\r\n") is None
    assert dec.feed_line("id: 7") is None
    assert dec.feed_line("data:two") is None
    assert dec.feed_line("\r\n") == "one\ntwo"
    assert dec.feed_line("\n") is None  # a blank line without data dispatches nothing
    dec.feed_line("data: [DONE]")
    assert dec.flush() == "[DONE]"  # stream ended without the blank line
    assert dec.flush() is None


def test_interpret_tgi_events():
    tok = stats.interpret_tgi(json.dumps({"token": {"id": 5, "text": " hi", "logprob": -0.1, "special": False},
                                          "generated_text": None, "details": None}))
    assert tok.kind == "token" and tok.text == " hi" and tok.tokens == 1
    fin = stats.interpret_tgi(json.dumps({"token": {"id": 2, "text": "", "special": True}, "generated_text": "x",
                                          "details": {"finish_reason": "length", "generated_tokens": 3,
                                                      "seed": None}}))
    assert fin.kind == "final" and fin.generated_tokens == 3 and fin.finish_reason == "length"
    fin2 = stats.interpret_tgi('{"token":{"id":2,"text":"."},"generated_text":"x.","details":null}')
    assert fin2.kind == "final" and fin2.generated_tokens is None
    err = stats.interpret_tgi('{"error":"Model is overloaded","error_type":"overloaded"}')
    assert err.kind == "error" and err.error == "overloaded: Model is overloaded"
    assert stats.interpret_tgi("not json").kind == "error"


def test_interpret_openai_chunks():
    chunk = {"id": "c", "object": "text_completion", "choices": [{"text": " a", "index": 0, "finish_reason": None}]}
    assert stats.interpret_openai(json.dumps(chunk)).kind == "token"
    chunk["choices"][0].update(text="", finish_reason="length")
    fin = stats.interpret_openai(json.dumps(chunk))
    assert fin.kind == "final" and fin.tokens == 0 and fin.finish_reason == "length"
    assert stats.interpret_openai("[DONE]").kind == "done"
    assert stats.interpret_openai('{"error":{"message":"bad"}}').error == "bad"


METRICS_BEFORE = """\
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 0
# TYPE tgi_batch_next_size histogram
tgi_batch_next_size_bucket{le="1"} 2
tgi_batch_next_size_bucket{le="2"} 2
tgi_batch_next_size_bucket{le="4"} 2
tgi_batch_next_size_bucket{le="+Inf"} 2
tgi_batch_next_size_sum 2
tgi_batch_next_size_count 2
# TYPE tgi_batch_inference_count counter
tgi_batch_inference_count{method="decode"} 10
tgi_batch_inference_count{method="prefill"} 2
"""

METRICS_AFTER = """\
tgi_batch_current_size 3
tgi_batch_next_size_bucket{le="1"} 3
tgi_batch_next_size_bucket{le="2"} 3
tgi_batch_next_size_bucket{le="4"} 5
tgi_batch_next_size_bucket{le="+Inf"} 5
tgi_batch_next_size_sum 10
tgi_batch_next_size_count 5
tgi_batch_inference_count{method="decode"} 110
tgi_batch_inference_count{method="prefill"} 5
tgi_request_failure{err="validation"} 1
tgi_request_failure{err="overloaded"} 2
"""


def test_parse_prometheus_and_values():
    after = stats.parse_prometheus(METRICS_AFTER)
    assert stats.metric_value(after, "tgi_batch_current_size") == 3
    assert stats.metric_value(after, "tgi_batch_inference_count", method="decode") == 110
    assert stats.metric_value(after, "tgi_request_failure") == 3  # summed over labels
    assert stats.metric_value(after, "nope") is None
    assert stats.histogram_buckets(after, "tgi_batch_next_size")[-1] == (math.inf, 5)


def test_histogram_delta_between_scrapes():
    d = stats.histogram_delta(stats.parse_prometheus(METRICS_BEFORE), stats.parse_prometheus(METRICS_AFTER),
                              "tgi_batch_next_size")
    assert d["count"] == 3 and d["sum"] == 8 and d["mean"] == pytest.approx(8 / 3)
    assert d["per_bucket"] == {"1": 1, "4": 2}
    assert d["max_le"] == 4


def test_histogram_delta_of_a_family_that_first_appears_after():
    d = stats.histogram_delta({}, stats.parse_prometheus(METRICS_AFTER), "tgi_batch_next_size")
    assert d["count"] == 5 and d["per_bucket"] == {"1": 3, "4": 2}


def test_commandstats_delta():
    before = stats.commandstats_calls({"cmdstat_publish": {"calls": 5, "usec": 1}, "other": 1})
    after = stats.commandstats_calls({"cmdstat_publish": {"calls": 9}, "cmdstat_exists": {"calls": 4}})
    assert stats.counter_delta(before, after) == {"publish": 4, "exists": 4}


def test_prompts_differ_and_have_the_requested_size():
    a, b = make_prompt(0, 32), make_prompt(1, 32)
    assert a != b
    assert 28 <= len(a.split()) <= 36
    tgi = make_payload("tgi", 3, 32, 128, sample=True, seed=10)
    assert tgi["parameters"] == {"max_new_tokens": 128, "details": True, "do_sample": True, "seed": 13}
    assert make_payload("tgi", 3, 32, 16, sample=False, seed=10)["parameters"]["do_sample"] is False
    oai = make_payload("openai", 0, 32, 16, sample=False, seed=0)
    assert oai["stream"] is True and oai["temperature"] == 0.0 and oai["max_tokens"] == 16


def test_summarize_run_counts_tokens_and_gaps():
    r1 = RequestResult(0, start=0.0, token_times=[0.5, 0.6, 0.8], tokens=3, end=0.8, ok=True,
                       finish_reason="length")
    r2 = RequestResult(1, start=0.0, token_times=[1.0], tokens=1, end=1.2, error="generation: boom")
    r3 = RequestResult(2, start=0.5, token_times=[1.5, 1.7], tokens=2, end=2.0, cut=True, error=None)
    res = summarize_run([r1, r2, r3], 2.0, api="tgi", url="u", clients=2, prompt_tokens=8, new_tokens=3,
                        sample=False, before=None, after=None, gauge=[])
    assert res["generated_tokens"] == 6 and res["tokens_per_s"] == 3.0
    assert res["completed"] == 1 and res["errors"] == 1 and res["cut_at_deadline"] == 1
    assert res["error_messages"] == ["generation: boom"]
    assert res["ttft_s"]["count"] == 3 and res["ttft_s"]["p50"] == pytest.approx(1.0)
    assert res["itl_s"]["count"] == 3 and res["itl_s"]["max"] == pytest.approx(0.2)
    assert res["latency_s"]["count"] == 1 and res["finish_reasons"] == {"length": 1}
    json.dumps(res)


def test_table_uses_the_median_of_paired_ratios_when_runs_alternated():
    from bench.report import format_table

    cfg = {"model": "m", "dtype": "bf16", "threads": 2, "new_tokens": 128, "prompt_tokens": 32, "repeats": 3,
           "loadavg_start": [0.1], "concurrency": [32]}
    res = {"config": cfg, "tgq": {"32": {"tokens_per_s": 400.0}}, "naive": {"32": {"tokens_per_s": 20.0}}}
    row = [ln for ln in format_table(res).splitlines() if ln.strip().startswith("32 |")][0]
    assert "20.00x" in row  # without pairs: the ratio of the medians
    res["paired_naive_ratio"] = {"32": {"pairs": [13.5, 14.6, 15.2], "median": 14.6}}
    table = format_table(res)
    row = [ln for ln in table.splitlines() if ln.strip().startswith("32 |")][0]
    assert "14.60x" in row and "20.00x" not in row
    assert "Pairs at C=32: 13.50, 14.60, 15.20" in table
