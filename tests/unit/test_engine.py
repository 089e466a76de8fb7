from __future__ import annotations

import math

import torch

from common.schemas import (ErrorEvent, FinalEvent, FinishReason, GenerationJob, SamplingParams,
                            StoppingParams, TokenEvent)
from common.settings import LimitSettings, WorkerSettings
from worker import engine as engine_module
from worker.engine import Engine
from worker.metrics import EngineMetrics


class ScriptedSource:
    """Releases each job at a given step number (the engine's step counter is our clock)."""

    def __init__(self, arrivals: dict[int, list[GenerationJob]]) -> None:
        self.arrivals = arrivals
        self.step = 0
        self.ready: list[GenerationJob] = []
        self.given_back: list[GenerationJob] = []
        self.fetched: list[tuple[int, int]] = []

    def tick(self) -> None:
        self.ready.extend(self.arrivals.pop(self.step, []))
        self.step += 1

    def fetch(self, max_jobs: int) -> list[GenerationJob]:
        out, self.ready = self.ready[:max_jobs], self.ready[max_jobs:]
        self.fetched.append((max_jobs, len(out)))
        return out

    def wait(self, timeout: float) -> None:
        self.tick()

    def give_back(self, jobs: list[GenerationJob]) -> None:
        self.given_back.extend(jobs)


class RecordingSink:
    def __init__(self) -> None:
        self.steps: list[tuple[list, list[str]]] = []  # each publish: (events, ids of the jobs held)
        self.at: list[int] = []  # the engine step of each publish
        self.finished_calls: list[tuple[int, str, object]] = []  # (engine step, request id, event)
        self.cancel_at: dict[int, set[str]] = {}  # engine step -> ids reported cancelled
        self.clock = lambda: len(self.steps) - 1  # the engine step now (run_engine sets it)

    def step_done(self, events, running):
        self.steps.append((list(events), [j.request_id for j in running]))
        self.at.append(self.clock())
        return self.cancel_at.get(self.clock(), set())

    def finished(self, leaving):
        assert leaving, "finished() is called only when some job left"
        self.finished_calls.extend((self.clock(), job.request_id, event) for job, event in leaving)

    def by_step(self) -> dict[int, tuple[list, list[str]]]:
        """Engine step -> (every event published in it, the jobs held at its last publish)."""
        out: dict[int, tuple[list, list[str]]] = {}
        for step, (events, running) in zip(self.at, self.steps):
            out[step] = (out.get(step, ([], []))[0] + events, running)
        return out

    def events_for(self, rid):
        return [e for evs, _ in self.steps for e in evs if e.request_id == rid]

    def result(self, rid):
        return next(ev for _, r, ev in self.finished_calls if r == rid)


def job(rid, prompt, n=8, want_tokens=True, want_prefill=False, **sampling) -> GenerationJob:
    return GenerationJob(rid, tuple(prompt), SamplingParams(**sampling), StoppingParams(max_new_tokens=n), "chan",
                         want_tokens=want_tokens, want_prefill=want_prefill, attempt=1)


def run_engine(loaded, arrivals, settings=None, sink=None, max_steps=200):
    source = ScriptedSource(arrivals)
    sink = sink or RecordingSink()
    sink.clock = lambda: source.step - 1  # tick() runs just before each engine step
    eng = Engine(loaded, settings or WorkerSettings(max_batch_size=8, waiting_served_ratio=0.0),
                 LimitSettings(), source, sink, EngineMetrics(8))
    for _ in range(max_steps):
        source.tick()
        eng.step()
        if not source.arrivals and not source.ready and eng.batch is None and not eng.scheduler.waiting:
            break
    return eng, source, sink


def generated_ids(sink, rid):
    return [e.token.id for e in sink.events_for(rid) if not isinstance(e, ErrorEvent)]


PROMPTS = [[5, 900, 33], [17, 2000, 3000, 44, 45, 46, 47, 48, 49], [100, 200, 300, 400, 500], list(range(1000, 1012))]


def test_greedy_tokens_do_not_depend_on_batch_composition(tiny_loaded):
    alone = {}
    for i, p in enumerate(PROMPTS):
        _, _, sink = run_engine(tiny_loaded, {0: [job(f"r{i}", p, n=6 + 2 * i)]})
        alone[f"r{i}"] = generated_ids(sink, f"r{i}")
    arrivals = {0: [job("r0", PROMPTS[0], n=6), job("r1", PROMPTS[1], n=8)],
                2: [job("r2", PROMPTS[2], n=10)], 5: [job("r3", PROMPTS[3], n=12)]}
    _, _, sink = run_engine(tiny_loaded, arrivals)
    for rid, tokens in alone.items():
        assert len(tokens) == 6 + 2 * int(rid[1:])
        assert generated_ids(sink, rid) == tokens, rid


def test_events_indices_and_final_event(tiny_loaded):
    tok = tiny_loaded.tokenizer
    prompt = tok("Hello there, my friend")["input_ids"]
    j = GenerationJob("x", tuple(prompt), SamplingParams(), StoppingParams(max_new_tokens=5), "chan",
                      want_tokens=True, want_prefill=True, attempt=3)
    _, _, sink = run_engine(tiny_loaded, {0: [j]})
    events = sink.events_for("x")
    assert [e.index for e in events] == [0, 1, 2, 3, 4]
    assert all(isinstance(e, TokenEvent) for e in events[:-1]) and isinstance(events[-1], FinalEvent)
    assert all(e.attempt == 3 for e in events)
    final = events[-1]
    ids = [e.token.id for e in events]
    assert final.generated_text == tok.decode(ids, skip_special_tokens=True)
    assert final.finish_reason is FinishReason.LENGTH and final.generated_tokens == 5
    assert final.seed is None
    assert [t.id for t in final.tokens] == ids
    assert "".join(t.text for t in final.tokens) == tok.decode(ids, skip_special_tokens=False)
    assert [p.id for p in final.prefill] == prompt
    assert final.prefill[0].logprob is None
    assert [p.text for p in final.prefill] == [tok.decode([i], skip_special_tokens=False) for i in prompt]
    # Prefill logprobs are the raw model log-softmax of each prompt id given the ones before it.
    with torch.no_grad():
        logits = tiny_loaded.model(torch.tensor([prompt])).logits[0].float()
    expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor([p.logprob for p in final.prefill[1:]]), expected, atol=1e-4)
    assert final.started_at <= final.finished_at
    assert sink.result("x") is final


def test_tokens_and_prefill_only_when_asked(tiny_loaded):
    _, _, sink = run_engine(tiny_loaded, {0: [job("y", PROMPTS[0], n=3, want_tokens=False)]})
    final = sink.result("y")
    assert final.tokens == () and final.prefill == ()


def test_one_token_prompts_get_prefill_details(tiny_loaded):
    """A prefill group one column wide predicts no prompt id: each row's prefill is its one id, logprob None."""
    alone = [job("a", [5], n=3, want_prefill=True)]
    together = [job("b", [5], n=3, want_prefill=True), job("c", [900], n=2, want_prefill=True)]
    for jobs in (alone, together):
        _, _, sink = run_engine(tiny_loaded, {0: jobs})
        for j in jobs:
            final = sink.result(j.request_id)
            assert isinstance(final, FinalEvent), final
            assert [(p.id, p.text, p.logprob) for p in final.prefill] == [
                (j.input_ids[0], tiny_loaded.tokenizer.decode(j.input_ids), None)]
            assert final.generated_tokens == len(final.tokens) == j.stopping.max_new_tokens


def test_rows_leave_on_the_step_they_finish_and_newcomers_join(tiny_loaded):
    arrivals = {0: [job("short", PROMPTS[0], n=2), job("long", PROMPTS[1], n=9)], 3: [job("late", PROMPTS[2], n=4)]}
    _, _, sink = run_engine(tiny_loaded, arrivals)
    steps = sink.by_step()
    final_step = {r: s for s, r, _ in sink.finished_calls}
    for rid in ("short", "long", "late"):
        step = final_step[rid]
        events, running = steps[step]
        assert any(isinstance(e, FinalEvent) and e.request_id == rid for e in events)
        assert rid not in running
        assert all(rid not in r for s, (_, r) in steps.items() if s > step)
    # "long" kept streaming, one token a step, while "late" joined (no restart of the batch).
    long_steps = [s for s, (evs, _) in steps.items() if any(e.request_id == "long" for e in evs)]
    assert long_steps == list(range(long_steps[0], long_steps[-1] + 1))
    late_steps = [s for s, (evs, _) in steps.items() if any(e.request_id == "late" for e in evs)]
    assert late_steps[0] > long_steps[0] and late_steps[0] < long_steps[-1]


def test_a_newcomers_first_token_goes_out_before_the_batch_decodes(tiny_loaded):
    arrivals = {0: [job("long", PROMPTS[1], n=9)], 3: [job("late", PROMPTS[2], n=4)]}
    _, _, sink = run_engine(tiny_loaded, arrivals)
    publishes = [(evs, running) for step, (evs, running) in zip(sink.at, sink.steps) if step == 3]
    assert len(publishes) == 2  # the prefill's first token, then the decode step of both rows
    (first, held), (second, _) = publishes
    assert [(e.request_id, e.index) for e in first] == [("late", 0)] and set(held) == {"long", "late"}
    assert sorted((e.request_id, e.index) for e in second) == [("late", 1), ("long", 4)]  # long: prefill + decode in step 0


def test_cancellation_drops_a_row_within_one_step(tiny_loaded):
    sink = RecordingSink()
    sink.cancel_at = {2: {"victim"}}
    arrivals = {0: [job("victim", PROMPTS[0], n=20), job("other", PROMPTS[2], n=8)]}
    _, _, sink = run_engine(tiny_loaded, arrivals, sink=sink)
    assert (2, "victim", None) in sink.finished_calls
    later = [p for step, p in zip(sink.at, sink.steps) if step > 2]
    assert later and all("victim" not in running for _, running in later)
    assert not any(e.request_id == "victim" for evs, _ in later for e in evs)
    assert len(generated_ids(sink, "other")) == 8


def test_same_seed_same_tokens_in_any_batch(tiny_loaded):
    params = dict(do_sample=True, temperature=0.9, top_p=0.95, seed=2**63 + 12345)
    _, _, alone = run_engine(tiny_loaded, {0: [job("s", PROMPTS[0], n=10, **params)]})
    arrivals = {0: [job("g", PROMPTS[1], n=12)], 1: [job("s", PROMPTS[0], n=10, **params),
                                                   job("t", PROMPTS[0], n=10, **{**params, "seed": 1})]}
    _, _, mixed = run_engine(tiny_loaded, arrivals)
    assert generated_ids(alone, "s") == generated_ids(mixed, "s")
    assert generated_ids(mixed, "s") != generated_ids(mixed, "t")
    assert alone.result("s").seed == 2**63 + 12345


def test_mean_logprob_for_best_of_is_available(tiny_loaded):
    arrivals = {0: [job(f"b{i}", PROMPTS[2], n=6, do_sample=True, seed=i) for i in range(2)]}
    _, _, sink = run_engine(tiny_loaded, arrivals)
    means = []
    for i in range(2):
        final = sink.result(f"b{i}")
        assert len(final.tokens) == final.generated_tokens == 6
        lps = [t.logprob for t in final.tokens]
        assert all(math.isfinite(lp) and lp <= 0 for lp in lps)
        means.append(sum(lps) / len(lps))
    assert len(set(means)) == 2


def test_invalid_input_gets_an_error_event_not_a_crash(tiny_loaded):
    arrivals = {0: [job("bad", [1, 10**6], n=3), job("good", PROMPTS[0], n=3), job("empty", [], n=3)]}
    _, _, sink = run_engine(tiny_loaded, arrivals)
    for rid in ("bad", "empty"):
        err = sink.result(rid)
        assert isinstance(err, ErrorEvent) and err.error_type == "generation"
        assert err.message.startswith("Server error: ")
    assert len(generated_ids(sink, "good")) == 3


def test_forward_failure_fails_the_batch_and_the_loop_goes_on(tiny_loaded, monkeypatch):
    real = engine_module.forward
    calls = {"n": 0}

    def flaky(loaded, input_ids, *args, **kwargs):
        if input_ids.shape[1] == 1:  # a decode step
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("boom")
        return real(loaded, input_ids, *args, **kwargs)

    monkeypatch.setattr(engine_module, "forward", flaky)
    arrivals = {0: [job("a", PROMPTS[0], n=10), job("b", PROMPTS[1], n=10)], 6: [job("c", PROMPTS[2], n=3)]}
    eng, _, sink = run_engine(tiny_loaded, arrivals)
    for rid in ("a", "b"):
        err = sink.result(rid)
        assert isinstance(err, ErrorEvent) and err.message == "Server error: boom"
    assert isinstance(sink.result("c"), FinalEvent)
    inc = eng.metrics.take_increments()
    assert inc["inference_failure:decode"] == 1.0
    assert inc["inference_success:prefill"] >= 2.0 and "inference_failure:prefill" not in inc


def test_run_stops_admitting_and_gives_back_unfinished(tiny_loaded):
    source = ScriptedSource({0: [job("r", PROMPTS[0], n=50)], 1: [job("w", PROMPTS[1], n=5)]})
    sink = RecordingSink()
    # "w" is fetched but does not fit the token budget beside "r", so it waits locally.
    eng = Engine(tiny_loaded, WorkerSettings(max_batch_size=2, max_batch_total_tokens=60), LimitSettings(),
                 source, sink)
    steps = {"n": 0}

    def should_stop():
        source.tick()
        steps["n"] += 1
        return steps["n"] > 4

    eng.run(should_stop, grace_s=0.0)
    # The waiting job goes back as soon as stopping starts; the running row when the grace ends.
    assert [j.request_id for j in source.given_back] == ["w", "r"]
    assert eng.batch is None


def test_run_finishes_rows_within_grace(tiny_loaded):
    source = ScriptedSource({0: [job("r", PROMPTS[0], n=5)]})
    sink = RecordingSink()
    eng = Engine(tiny_loaded, WorkerSettings(), LimitSettings(), source, sink)
    source.tick()
    eng.step()
    eng.run(lambda: True, grace_s=30.0)
    assert isinstance(sink.result("r"), FinalEvent)
    assert source.given_back == []


def test_step_done_gets_waiting_jobs_too_for_leases(tiny_loaded):
    settings = WorkerSettings(max_batch_size=4, waiting_served_ratio=10.0, max_waiting_tokens=3)
    arrivals = {0: [job("a", PROMPTS[0], n=8)], 2: [job("w", PROMPTS[1], n=2)]}
    _, _, sink = run_engine(tiny_loaded, arrivals, settings=settings)
    waiting_steps = [s for s, (evs, running) in enumerate(sink.steps)
                     if "w" in running and not any(e.request_id == "w" for e in evs)]
    assert waiting_steps  # held locally (ratio not met) and reported for lease renewal


def test_metrics_increments_are_recorded(tiny_loaded):
    eng, _, _ = run_engine(tiny_loaded, {0: [job("m", PROMPTS[0], n=4)]})
    inc = eng.metrics.take_increments()
    assert inc["inference_count:prefill"] == 1.0 and inc["inference_success:decode"] == 3.0
    assert inc["next_size_count"] == 1.0 and inc["next_size_bucket:0"] == 1.0
    assert eng.metrics.take_increments() == {}
    assert eng.metrics.current_size == 0


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(tiny_loaded):
    """While "long" decodes, a 12-token newcomer is fed 4 tokens a step: "long" gets a token every
    step meanwhile, and both outputs (and the newcomer's prompt logprobs) equal those of a run alone."""
    chunked = WorkerSettings(max_batch_size=8, waiting_served_ratio=0.0, prefill_chunk_tokens=4)
    late = GenerationJob("late", tuple(PROMPTS[3]), SamplingParams(), StoppingParams(max_new_tokens=5), "chan",
                         want_tokens=True, want_prefill=True, attempt=1)
    _, _, sink = run_engine(tiny_loaded, {0: [job("long", PROMPTS[1], n=12)], 2: [late]}, settings=chunked)
    steps = sink.by_step()
    long_steps = [s for s, (evs, _) in steps.items() if any(e.request_id == "long" for e in evs)]
    assert long_steps == list(range(11))  # 2 tokens in step 0 (prefill + decode), then one every step
    late_steps = [s for s, (evs, _) in steps.items() if any(e.request_id == "late" for e in evs)]
    assert late_steps[0] == 4  # admitted at step 2, fed in steps 2, 3 and 4 (12 tokens / 4)
    assert all("late" in running for s, (_, running) in steps.items() if 2 <= s < late_steps[0])  # leased meanwhile

    _, _, alone_long = run_engine(tiny_loaded, {0: [job("long", PROMPTS[1], n=12)]})
    _, _, alone_late = run_engine(tiny_loaded, {0: [late]})
    assert generated_ids(sink, "long") == generated_ids(alone_long, "long")
    assert generated_ids(sink, "late") == generated_ids(alone_late, "late")
    got, want = sink.result("late").prefill, alone_late.result("late").prefill
    assert [p.id for p in got] == [p.id for p in want] == PROMPTS[3]
    assert got[0].logprob is None and want[0].logprob is None
    assert torch.allclose(torch.tensor([p.logprob for p in got[1:]]), torch.tensor([p.logprob for p in want[1:]]),
                          atol=1e-4)


def test_many_newcomers_next_to_few_running_rows_get_a_larger_prefill_budget(tiny_loaded):
    """4 newcomers of 12 tokens next to 1 running row, 4 tokens per chunk: the budget grows by the
    ratio 4/1 to 16 tokens (4 columns of 4 rows) a step, so their first tokens come 3 steps after
    admission, not 12; with 1 newcomer per running row it stays 4 (see the test above)."""
    chunked = WorkerSettings(max_batch_size=8, waiting_served_ratio=0.0, prefill_chunk_tokens=4)
    wave = [job(f"w{i}", [3000 + i + k for k in range(12)], n=3) for i in range(4)]
    _, _, sink = run_engine(tiny_loaded, {0: [job("early", PROMPTS[1], n=12)], 2: wave}, settings=chunked)
    steps = sink.by_step()
    first = {j.request_id: min(s for s, (evs, _) in steps.items() if any(e.request_id == j.request_id for e in evs))
             for j in wave}
    assert set(first.values()) == {4}  # admitted at step 2, fed in steps 2, 3 and 4
    early_steps = [s for s, (evs, _) in steps.items() if any(e.request_id == "early" for e in evs)]
    assert early_steps == list(range(11))  # the running row still gets a token every step
    for j in wave:
        _, _, alone = run_engine(tiny_loaded, {0: [job(j.request_id, j.input_ids, n=3)]})
        assert generated_ids(sink, j.request_id) == generated_ids(alone, j.request_id)


def test_a_row_cancelled_during_its_chunked_prefill_leaves_without_events(tiny_loaded):
    chunked = WorkerSettings(max_batch_size=8, waiting_served_ratio=0.0, prefill_chunk_tokens=4)
    sink = RecordingSink()
    sink.cancel_at = {3: {"late"}}  # admitted at step 2, still being fed at step 3
    arrivals = {0: [job("long", PROMPTS[1], n=10)], 2: [job("late", PROMPTS[3], n=5)]}
    eng, _, sink = run_engine(tiny_loaded, arrivals, settings=chunked, sink=sink)
    assert (3, "late", None) in sink.finished_calls
    assert not any(e.request_id == "late" for evs, _ in sink.steps for e in evs)
    assert len(generated_ids(sink, "long")) == 10
    assert not eng.pending and not eng.scheduler.running


def test_prompt_logprobs_are_the_same_when_their_logits_are_taken_a_few_positions_at_a_time(tiny_loaded,
                                                                                            monkeypatch):
    """details.prefill needs every prompt position's logits; they are computed LOGITS_TOKENS positions
    per forward (memory stays bounded for long prompts) and must equal one full forward's."""
    from worker import prefill as prefill_module

    prompt = PROMPTS[3]
    j = GenerationJob("p", tuple(prompt), SamplingParams(), StoppingParams(max_new_tokens=3), "chan",
                      want_tokens=True, want_prefill=True, attempt=0)
    _, _, whole = run_engine(tiny_loaded, {0: [j]})
    monkeypatch.setattr(prefill_module, "LOGITS_TOKENS", 5)  # 12 prompt positions: 3 forwards
    _, _, parts = run_engine(tiny_loaded, {0: [j]})
    a, b = whole.result("p"), parts.result("p")
    assert [p.id for p in a.prefill] == [p.id for p in b.prefill] == prompt
    assert torch.allclose(torch.tensor([p.logprob for p in a.prefill[1:]]),
                          torch.tensor([p.logprob for p in b.prefill[1:]]), atol=1e-5)
    assert [t.id for t in a.tokens] == [t.id for t in b.tokens]


def test_a_strong_presence_penalty_stops_a_greedy_row_from_repeating(tiny_loaded):
    """The tiny model loops on one or two ids; with presence_penalty 2 no generated id comes back, alone
    or while other rows join and leave its batch (each row's counts follow it)."""
    _, _, plain = run_engine(tiny_loaded, {0: [job("p", PROMPTS[0], n=24)]})
    assert len(set(generated_ids(plain, "p"))) <= 2
    _, _, alone = run_engine(tiny_loaded, {0: [job("p", PROMPTS[0], n=24, presence_penalty=2.0)]})
    ids = generated_ids(alone, "p")
    assert len(ids) == len(set(ids)) == 24
    arrivals = {0: [job("q", PROMPTS[1], n=3, frequency_penalty=1.0), job("g", PROMPTS[3], n=6)],
                1: [job("p", PROMPTS[0], n=24, presence_penalty=2.0)], 4: [job("r", PROMPTS[2], n=5)]}
    _, _, mixed = run_engine(tiny_loaded, arrivals)
    assert generated_ids(mixed, "p") == ids
    assert generated_ids(mixed, "g") == generated_ids(run_engine(tiny_loaded, {0: [job("g", PROMPTS[3], n=6)]})[2], "g")


def test_tokens_carry_their_top_alternatives_when_asked(tiny_loaded):
    """Every token of a row with top_n_tokens (the first one, chosen after prefill, too) lists that many
    ids of its distribution, most likely first, with their own text; rows that do not ask list none."""
    from common import protocol

    arrivals = {0: [job("t", PROMPTS[0], n=4, top_n_tokens=5), job("u", PROMPTS[2], n=4)],
                2: [job("s", PROMPTS[1], n=3, top_n_tokens=3, do_sample=True, top_k=2, seed=5)]}
    _, _, sink = run_engine(tiny_loaded, arrivals)
    assert all(e.token.top == () for e in sink.events_for("u"))
    first = torch.log_softmax(tiny_loaded.model(torch.tensor([PROMPTS[0]])).logits[0, -1].float(), dim=-1)
    assert [t.id for t in sink.events_for("t")[0].token.top] == torch.topk(first, 5).indices.tolist()
    for rid, n in (("t", 5), ("s", 3)):
        events = sink.events_for(rid)
        assert len(events) > 2 and sink.result(rid).tokens == tuple(e.token for e in events)
        for e in events:
            top = e.token.top
            assert len(top) == len({t.id for t in top}) == n
            assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
            assert all(t.text == tiny_loaded.tokenizer.decode([t.id]) and t.top == () for t in top)
            assert all(t.special == (t.id in tiny_loaded.special_ids) for t in top)
            assert {t.id: t.logprob for t in top}[e.token.id] == e.token.logprob
    for e in sink.events_for("t"):  # greedy: the chosen token comes first
        assert (e.token.top[0].id, e.token.top[0].logprob) == (e.token.id, e.token.logprob)
    for e in sink.events_for("s"):  # top_k 2: the third alternative was removed
        assert math.isinf(e.token.top[2].logprob)
    final = sink.result("t")
    assert protocol.decode_event(protocol.encode_event(final)) == final
    wire = protocol.decode_event(protocol.encode_event(sink.result("s"))).token.top
    assert [t.id for t in wire] == [t.id for t in sink.result("s").token.top] and math.isnan(wire[2].logprob)
