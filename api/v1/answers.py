"""One choice's answer as OpenAI returns it, from the worker's text: a matched stop sequence is cut
(the worker keeps it, as TGI's routes must), and an answer that is a tool call comes back as
`tool_calls` with `finish_reason: "tool_calls"` (`api.v1.tools`).

In a stream the same rules decide what each token may show at once: text that could still become a
stop sequence is held back until it cannot, and once a choice's answer opens a tool call (its first
character is `{`) nothing is shown until the call is complete.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.schemas import FinalEvent, FinishReason, Token

from .tools import Tools, calls_in


def finish_reason(final: FinalEvent) -> str:
    return "length" if final.finish_reason is FinishReason.LENGTH else "stop"


def piece(token: Token) -> str:
    """What a token adds to the content: its text, or nothing for a special token (EOS, ...)."""
    return "" if token.special else token.text


@dataclass(frozen=True)
class Answer:
    content: str | None
    tool_calls: list[dict[str, Any]] | None
    finish_reason: str


@dataclass(frozen=True)
class AnswerRules:
    stops: tuple[str, ...] = ()
    tools: Tools | None = None  # only when active

    def cut(self, final: FinalEvent) -> str:
        """The answer's text without the stop sequence that ended it."""
        text = final.generated_text
        if final.finish_reason is FinishReason.STOP_SEQUENCE:
            matched = max((s for s in self.stops if s and text.endswith(s)), key=len, default="")
            text = text[:len(text) - len(matched)]
        return text

    def answer(self, final: FinalEvent) -> Answer:
        text = self.cut(final)
        if self.tools is not None and final.finish_reason is not FinishReason.LENGTH:
            calls = calls_in(text)
            if calls is not None:
                return Answer(None, calls, "tool_calls")
        return Answer(text, None, finish_reason(final))

    def stream(self) -> StreamAnswer:
        return StreamAnswer(self)


@dataclass
class StreamAnswer:
    """One choice of a stream: what each token shows, and what the final event adds."""
    rules: AnswerRules
    sent: str = ""  # content shown so far
    held: str = ""  # text received but not shown yet
    call: bool | None = field(default=None)  # None: a tool call or text, not decided yet

    def token(self, token: Token) -> str | None:
        """The text this token shows now ("" when it is held back); None once the answer is a tool call."""
        self.held += piece(token)
        if self.rules.tools is not None and self.call is None:
            start = self.held.lstrip()
            if not start:
                return ""
            self.call = start.startswith("{")
        if self.call:
            return None
        keep = _stop_prefix(self.held, self.rules.stops)
        shown, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        self.sent += shown
        return shown

    def final(self, final: FinalEvent) -> tuple[str, Answer]:
        """The text the last chunk shows (the rest of the answer after what was sent) and the answer."""
        answer = self.rules.answer(final)
        if answer.tool_calls is not None or answer.content is None:
            return "", answer
        rest = answer.content[len(self.sent):] if answer.content.startswith(self.sent) else ""
        return rest, answer


def _stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could begin a stop sequence (and so must wait)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop), len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
