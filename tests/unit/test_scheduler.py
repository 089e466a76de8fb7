from __future__ import annotations

from common.settings import LimitSettings, WorkerSettings
from worker.scheduler import Budget, Entry, Scheduler


def budget(**kw) -> Budget:
    base = dict(max_batch_size=4, max_batch_total_tokens=1000, max_batch_prefill_tokens=100,
                waiting_served_ratio=1.0, max_waiting_tokens=3)
    base.update(kw)
    return Budget(**base)


def entry(key: int, prompt: int = 10, new: int = 10) -> Entry[int]:
    return Entry(key, key, prompt, new)


def keys(entries) -> list:
    return [e.key for e in entries]


def test_total_budget_defaults_to_batch_size_times_max_total_tokens():
    b = Budget.from_settings(WorkerSettings(max_batch_size=8), LimitSettings(max_total_tokens=100,
                                                                             max_input_length=50))
    assert b.max_batch_total_tokens == 800
    b = Budget.from_settings(WorkerSettings(max_batch_total_tokens=123), LimitSettings())
    assert b.max_batch_total_tokens == 123


def test_idle_admission_is_fifo_and_respects_prefill_budget():
    s = Scheduler(budget(max_batch_prefill_tokens=25))
    for k in range(4):
        s.add(entry(k))
    assert keys(s.admit()) == [0, 1]
    assert keys(s.waiting) == [2, 3]


def test_batch_size_and_total_budget():
    s = Scheduler(budget(max_batch_size=3, max_batch_total_tokens=50))
    for k in range(5):
        s.add(entry(k))
    assert keys(s.admit()) == [0, 1]  # 3 x 20 reserved tokens would exceed 50
    assert s.running_tokens == 40
    s.release(0)
    s.steps_since_admit = 99
    assert keys(s.admit()) == [2]


def test_strict_fifo_no_skipping():
    s = Scheduler(budget(max_batch_prefill_tokens=30))
    s.add(entry(0, prompt=20))
    s.add(entry(1, prompt=20))
    s.add(entry(2, prompt=5))
    assert keys(s.admit()) == [0]  # entry 2 would fit, but it may not jump over entry 1


def test_oversized_prompt_is_admitted_alone_and_never_wedges():
    s = Scheduler(budget(max_batch_prefill_tokens=50))
    s.add(entry(0, prompt=500))
    s.add(entry(1))
    assert keys(s.admit()) == [0]
    # While it runs, an oversized head also goes alone once the ratio allows admission.
    s.add(entry(2, prompt=400))
    s.steps_since_admit = 99
    assert keys(s.admit()) == [1]
    s.steps_since_admit = 99
    assert keys(s.admit()) == [2]


def test_total_budget_oversize_waits_while_busy_then_runs_alone():
    s = Scheduler(budget(max_batch_total_tokens=100))
    s.add(entry(0, prompt=10, new=50))
    assert keys(s.admit()) == [0]
    s.add(entry(1, prompt=10, new=200))
    s.steps_since_admit = 99
    assert s.admit() == []
    s.release(0)
    assert keys(s.admit()) == [1]


def test_waiting_served_ratio_and_max_waiting_tokens():
    s = Scheduler(budget(max_batch_size=8, waiting_served_ratio=1.0, max_waiting_tokens=3))
    for k in range(2):
        s.add(entry(k))
    assert keys(s.admit()) == [0, 1]
    s.add(entry(2))
    assert s.admit() == []  # 1 waiting < 2 running * 1.0
    s.on_step()
    s.on_step()
    assert s.admit() == []
    s.on_step()
    assert keys(s.admit()) == [2]  # waited max_waiting_tokens steps: no minimum any more
    for k in range(3, 6):
        s.add(entry(k))
    assert keys(s.admit()) == [3, 4, 5]  # 3 waiting >= 3 running


def test_min_size_is_capped_by_free_slots():
    s = Scheduler(budget(max_batch_size=4, waiting_served_ratio=1.2))
    for k in range(3):
        s.add(entry(k))
    assert keys(s.admit()) == [0, 1, 2]
    s.add(entry(3))
    assert keys(s.admit()) == [3]  # 1 free slot: filling it is enough


def test_room_counts_running_and_waiting():
    s = Scheduler(budget(max_batch_size=4))
    assert s.room() == 4
    s.add(entry(0))
    s.add(entry(1))
    assert s.room() == 2
    s.admit()
    assert s.room() == 2
    s.add(entry(2))
    assert s.room() == 1
    assert keys(s.remove_waiting({2})) == [2]
    assert keys(s.take_waiting()) == []


def test_prefill_groups_bound_padding_and_cover_everyone():
    from worker.scheduler import prefill_groups

    lengths = [16, 200, 20, 180, 18, 190]
    groups = prefill_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        real = sum(lengths[i] for i in g)
        assert len(g) * max(lengths[i] for i in g) <= 1.25 * real or len(g) == 1
    assert len(groups) == 2
    assert prefill_groups([7]) == [[0]]
    assert prefill_groups([5, 5, 5]) == [[0, 1, 2]]
