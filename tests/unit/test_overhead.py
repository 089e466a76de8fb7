"""bench.overhead's pure parts: the request stream and the closed loop that feeds the in-process engine."""
from __future__ import annotations

import time

from bench import overhead
from common.schemas import ErrorEvent, FinalEvent, FinishReason, GenerationJob, SamplingParams, StoppingParams, Token


def test_the_stream_alternates_chat_questions_and_stories_with_seeded_lengths():
    bodies = overhead.request_stream(10, 3, lambda q: f"<chat>{q}</chat>", 32, 16, 40)
    assert [b["inputs"].startswith("<chat>") for b in bodies] == [True, False] * 5
    lengths = [b["parameters"]["max_new_tokens"] for b in bodies]
    assert all(16 <= n <= 40 for n in lengths)
    assert lengths == [b["parameters"]["max_new_tokens"] for b in overhead.request_stream(10, 3, str, 32, 16, 40)]
    assert all(b["parameters"]["do_sample"] is False for b in bodies)


def job(i: int) -> GenerationJob:
    return GenerationJob(f"r{i}", (1, 2), SamplingParams(), StoppingParams(max_new_tokens=4), "")


def final(j: GenerationJob) -> FinalEvent:
    return FinalEvent(j.request_id, 0, 3, Token(1, "a", 0.0, False), "aaaa", FinishReason.LENGTH, 4, None,
                      time.time(), time.time())


def test_the_closed_loop_hands_over_a_job_only_when_one_in_flight_ends():
    loop = overhead.ClosedLoop([job(i) for i in range(5)], clients=2)
    first = loop.fetch(8)
    assert [j.request_id for j in first] == ["r0", "r1"] and loop.fetch(8) == []
    loop.finished([(first[0], final(first[0]))])
    assert [j.request_id for j in loop.fetch(8)] == ["r2"]
    loop.finished([(first[1], ErrorEvent("r1", 0, "boom", "generation"))])
    assert loop.errors and len(loop.finals) == 1 and not loop.done
