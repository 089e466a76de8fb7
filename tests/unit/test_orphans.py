"""Which reply channels count as abandoned: PUBLISH's subscriber counts over time (worker.rq_worker.Orphans)."""
from worker.rq_worker import Orphans


def test_a_channel_is_dead_only_after_the_grace_period_of_silence():
    o = Orphans(grace_s=10)
    assert o.heard(["a", "b"], [1, 0], now=0.0) == set()
    assert o.heard(["a", "b"], [1, 0], now=9.0) == set()
    assert o.heard(["a", "b"], [1, 0], now=10.5) == {"b"}


def test_one_listened_message_resets_the_silence():
    o = Orphans(grace_s=10)
    o.heard(["b"], [0], now=0.0)
    o.heard(["b"], [2], now=8.0)  # resubscribed within the grace: alive again
    assert o.heard(["b"], [0], now=15.0) == set()
    assert o.heard(["b"], [0], now=25.5) == {"b"}


def test_v1_messages_to_one_channel_count_as_heard_if_any_was():
    o = Orphans(grace_s=1)
    o.heard(["a", "a"], [0, 1], now=0.0)
    assert o.heard(["a"], [1], now=5.0) == set()


def test_forgotten_channels_start_afresh():
    o = Orphans(grace_s=1)
    o.heard(["a"], [0], now=0.0)
    o.forget(set())
    assert o.heard(["a"], [0], now=5.0) == set()
