"""Relay: which worker events reach the client when jobs are re-run or messages are lost."""
from __future__ import annotations

from api.core.replies import Relay
from common.schemas import ErrorEvent, FinalEvent, FinishReason, Token, TokenEvent


def t(i: int) -> Token:
    return Token(i, f"t{i}", -0.1, False)


def token(index: int, token_id: int, attempt: int = 0) -> TokenEvent:
    return TokenEvent("r", attempt, index, t(token_id))


def final(index: int, attempt: int = 0) -> FinalEvent:
    return FinalEvent("r", attempt, index, t(99), "text", FinishReason.LENGTH, index + 1, None, 0.0, 0.0)


def test_each_index_once_and_stale_attempts_dropped() -> None:
    relay = Relay()
    assert relay.accept(token(0, 10)) is not None
    assert relay.accept(token(1, 11)) is not None
    assert relay.accept(token(0, 10, attempt=1)) is None  # re-run repeats what was sent
    assert relay.accept(token(1, 11, attempt=0)) is None  # still in flight from the dead attempt
    assert relay.accept(token(2, 12, attempt=0)) is None  # stale: attempt 1 is the live one
    assert relay.accept(token(1, 11, attempt=1)) is None
    assert relay.accept(token(2, 12, attempt=1)) is not None
    assert relay.accept(final(3, attempt=1)) is not None
    assert relay.sent_ids == [10, 11, 12]


def test_divergent_rerun_is_an_error() -> None:
    relay = Relay()
    relay.accept(token(0, 10))
    out = relay.accept(token(0, 77, attempt=1))
    assert isinstance(out, ErrorEvent) and out.error_type == "generation"


def test_a_gap_holds_back_every_later_token_of_the_attempt() -> None:
    relay = Relay()
    assert relay.accept(token(0, 10)) is not None
    assert relay.accept(token(2, 12)) is None  # index 1 was lost in transit
    assert relay.accept(token(3, 13)) is None
    assert relay.sent_ids == [10] and relay.gap
    assert relay.accept(final(4)) is not None  # the final event fills the gap (GenerationService.events)


def test_a_rerun_clears_the_gap() -> None:
    relay = Relay()
    relay.accept(token(0, 10))
    relay.accept(token(2, 12))
    assert relay.accept(token(0, 10, attempt=1)) is None  # already sent
    assert relay.accept(token(1, 11, attempt=1)) is not None
    assert relay.accept(token(2, 12, attempt=1)) is not None
    assert relay.sent_ids == [10, 11, 12] and not relay.gap


def test_final_before_what_was_sent_is_an_error() -> None:
    relay = Relay()
    relay.accept(token(0, 10))
    relay.accept(token(1, 11))
    assert isinstance(relay.accept(final(1, attempt=1)), ErrorEvent)
