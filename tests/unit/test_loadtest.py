"""worker/loadtest.py: the pacing rule and the loop against in-memory source/sink fakes."""
from __future__ import annotations

import time

from common.schemas import FinalEvent, GenerationJob, SamplingParams, StoppingParams, TokenEvent
from worker.loadtest import PLACEHOLDER, LoadTestLoop, next_step_at


def test_next_step_at_keeps_a_fixed_grid_and_does_not_burst():
    assert next_step_at(10.0, 10.001, 0.1) == 10.1  # on time: the grid, not now + interval
    assert next_step_at(10.0, 10.15, 0.1) == 10.1  # a little late: catch up one step
    assert next_step_at(10.0, 10.5, 0.1) == 10.5  # far behind: restart the grid now, no burst


def job(rid: str, n: int, want_tokens: bool = False, sample: bool = False) -> GenerationJob:
    return GenerationJob(rid, (1, 2), SamplingParams(do_sample=sample, seed=7), StoppingParams(n), "ch",
                         want_tokens=want_tokens)


class Fake:
    def __init__(self, jobs: list[GenerationJob], cancel: set[str] = frozenset()) -> None:
        self.waiting = list(jobs)
        self.cancel = set(cancel)
        self.steps: list[tuple[list, list[str]]] = []
        self.left: list[tuple[str, object]] = []
        self.given_back: list[str] = []

    def fetch(self, n):  # noqa: ANN001, ANN201
        out, self.waiting = self.waiting[:n], self.waiting[n:]
        return out

    def wait(self, timeout):  # noqa: ANN001, ANN201
        time.sleep(min(timeout, 0.01))

    def give_back(self, jobs):  # noqa: ANN001, ANN201
        self.given_back += [j.request_id for j in jobs]

    def step_done(self, events, running):  # noqa: ANN001, ANN201
        self.steps.append((events, [j.request_id for j in running]))
        return {r for r in self.cancel if r in {j.request_id for j in running} and len(self.steps) >= 2}

    def finished(self, leaving):  # noqa: ANN001, ANN201
        self.left += [(j.request_id, e) for j, e in leaving]


def test_loop_emits_indexed_tokens_finals_and_drops_cancelled():
    fake = Fake([job("a", 3, want_tokens=True), job("b", 5, sample=True), job("c", 9), job("d", 2)],
                cancel={"c"})
    loop = LoadTestLoop(1000.0, 3, fake, fake)  # batch of 3: "d" waits for a free row
    while loop.step():
        pass
    events = [e for evs, _ in fake.steps for e in evs]
    for rid, n in (("a", 3), ("b", 5), ("d", 2)):
        mine = [e for e in events if e.request_id == rid]
        assert [e.index for e in mine] == list(range(n))
        assert all(isinstance(e, TokenEvent) and e.token == PLACEHOLDER for e in mine[:-1])
        final = mine[-1]
        assert isinstance(final, FinalEvent) and final.generated_tokens == n
        assert final.generated_text == PLACEHOLDER.text * n and final.finish_reason.value == "length"
    finals = {rid: e for rid, e in fake.left}
    assert finals["a"].tokens == (PLACEHOLDER,) * 3 and finals["b"].tokens == ()
    assert finals["a"].seed is None and finals["b"].seed == 7
    assert finals["c"] is None  # cancelled after its second step: leaves without a final event
    assert len([e for e in events if e.request_id == "c"]) == 2
    assert any(e.request_id == "d" and e.index == 0 for e in fake.steps[2][0])  # took the row "c" left


def test_run_paces_steps_and_gives_back_on_stop():
    fake = Fake([job("a", 1000)])
    loop = LoadTestLoop(100.0, 4, fake, fake)
    t0 = time.monotonic()
    loop.run(should_stop=lambda: time.monotonic() - t0 > 0.3, grace_s=0.0)
    steps = len(fake.steps)
    assert 20 <= steps <= 40  # ~30 steps of 10 ms in 0.3 s
    assert fake.given_back == ["a"]
