"""OpenAI response bodies and stream chunks built from worker events (pure, no Flask).

Chat content and completion text leave special tokens out (the non-stream text is the worker's
decode with `skip_special_tokens`, and the stream's pieces are the same tokens' texts), so the
joined stream deltas equal the non-stream content. `finish_reason` is OpenAI's: `stop` for EOS or
a stop string (which is cut from the text), `length` for `max_tokens`, `tool_calls` for an answer that
is a tool call (`api.v1.answers`).
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import orjson

from common.schemas import FinalEvent, Token

from ..core.numbers import f32_logprob
from .answers import AnswerRules

FINGERPRINT = "tgq-0.1.0"
NO_LOGPROB = -9999.0  # OpenAI's value for a logprob that is not a finite number
DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    """OpenAI's framing: `data: ` (with the space TGI 3 writes on these routes) + compact JSON."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _logprob(x: float) -> float:
    value = f32_logprob(x)
    return NO_LOGPROB if value is None or not math.isfinite(value) else value


def _entry(token: Token) -> dict[str, Any]:
    return {"token": token.text, "logprob": _logprob(token.logprob), "bytes": list(token.text.encode())}


def chat_logprobs(tokens: Sequence[Token]) -> dict[str, Any]:
    """`choices[i].logprobs` of a chat answer: one entry per content token with its alternatives."""
    return {"content": [{**_entry(t), "top_logprobs": [_entry(a) for a in t.top]} for t in tokens if not t.special],
            "refusal": None}


def completion_logprobs(tokens: Sequence[Token], offset: int = 0) -> dict[str, Any]:
    """The legacy completions `logprobs` object; `offset` is the text length before these tokens."""
    shown = [t for t in tokens if not t.special]
    offsets = []
    for t in shown:
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": [t.text for t in shown], "token_logprobs": [_logprob(t.logprob) for t in shown],
            "top_logprobs": [{a.text: _logprob(a.logprob) for a in t.top} for t in shown],
            "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Envelope:
    """The fields every body and chunk of one response shares."""
    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        shared = {"id": self.id, "created": self.created, "model": self.model, "system_fingerprint": FINGERPRINT}
        # the leading fields of the whole body and of every stream chunk, built once per response
        self._body_head = {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                           **shared}
        self._chunk_head = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                            **shared}

    # non-stream ---------------------------------------------------------------------------

    def body(self, finals: Sequence[FinalEvent], prompt_tokens: int, logprobs: bool,
             rules: AnswerRules) -> dict[str, Any]:
        choices = [self._choice(i, f, logprobs, rules) for i, f in enumerate(finals)]
        return {**self._body_head, "choices": choices,
                "usage": usage(prompt_tokens, sum(f.generated_tokens for f in finals))}

    def _choice(self, index: int, final: FinalEvent, logprobs: bool, rules: AnswerRules) -> dict[str, Any]:
        answer = rules.answer(final)
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": answer.content, "refusal": None}
            if answer.tool_calls is not None:
                message["tool_calls"] = answer.tool_calls
            return {"index": index, "message": message,
                    "logprobs": chat_logprobs(final.tokens) if logprobs else None,
                    "finish_reason": answer.finish_reason}
        return {"index": index, "text": answer.content,
                "logprobs": completion_logprobs(final.tokens) if logprobs else None,
                "finish_reason": answer.finish_reason}

    # stream -------------------------------------------------------------------------------

    def chunk(self, index: int, token: Token | None, *, text: str = "", role: bool = False, logprobs: bool = False,
              offset: int = 0, reason: str | None = None, with_usage: bool = False,
              tool_calls: list[dict[str, Any]] | None = None) -> bytes:
        """One choice's chunk: `text` with its token's logprobs (no token: the role chunk of a chat), or
        a piece of its tool calls."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {"content": text}
            if tool_calls is not None:
                delta = {"tool_calls": tool_calls}
            lp = chat_logprobs([token]) if logprobs and token is not None else None
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
        else:
            lp = completion_logprobs([token], offset) if logprobs and token is not None else None
            choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}
        out = {**self._chunk_head, "choices": [choice]}
        if with_usage:
            out["usage"] = None  # OpenAI: every chunk carries the field; only the last has the figures
        return sse(out)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return sse({**self._chunk_head, "choices": [],
                    "usage": usage(prompt_tokens, completion_tokens)})

    def tool_call_chunks(self, index: int, calls: list[dict[str, Any]], *, with_usage: bool) -> list[bytes]:
        """A choice's calls as the `openai` SDK assembles them: per call its index, id, type and name
        first, then its arguments."""
        out = []
        for k, call in enumerate(calls):
            head = {"index": k, "id": call["id"], "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""}}
            out.append(self.chunk(index, None, tool_calls=[head], with_usage=with_usage))
            args = {"index": k, "function": {"arguments": call["function"]["arguments"]}}
            out.append(self.chunk(index, None, tool_calls=[args], with_usage=with_usage))
        return out
