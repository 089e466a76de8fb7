"""Records exchanged between the API and the workers (carried as JSON by `common.protocol`).

A job is what the API enqueues: the prompt already tokenized and truncated, the validated
parameters, and where to send replies. Events are what a worker publishes while it runs the job.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class FinishReason(str, Enum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


@dataclass(frozen=True)
class SamplingParams:
    """Validated TGI parameters with the router's defaults filled in (top_k 0 / top_p 1.0 = off)."""
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    watermark: bool = False
    seed: int = 0  # always set: drawn by the API when the client gave none
    # OpenAI's penalties (the /v1 routes): after the repetition penalty, each id's score loses
    # frequency_penalty * (times it was generated) + presence_penalty * (1 if it was generated).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    top_n_tokens: int = 0  # how many most likely alternatives to report with each generated token

    @property
    def sampling(self) -> bool:
        """Whether the worker samples (TGI shard rule: any active warper forces sampling)."""
        return (self.do_sample or self.temperature != 1.0 or self.top_k != 0
                or self.top_p < 1.0 or self.typical_p < 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"do_sample": self.do_sample, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "typical_p": self.typical_p,
                "repetition_penalty": self.repetition_penalty, "watermark": self.watermark,
                "seed": self.seed, "frequency_penalty": self.frequency_penalty,
                "presence_penalty": self.presence_penalty, "top_n_tokens": self.top_n_tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        return cls(do_sample=bool(d["do_sample"]), temperature=float(d["temperature"]),
                   top_k=int(d["top_k"]), top_p=float(d["top_p"]), typical_p=float(d["typical_p"]),
                   repetition_penalty=float(d["repetition_penalty"]), watermark=bool(d["watermark"]),
                   seed=int(d["seed"]), frequency_penalty=float(d.get("frequency_penalty", 0.0)),
                   presence_penalty=float(d.get("presence_penalty", 0.0)),
                   top_n_tokens=int(d.get("top_n_tokens", 0)))


@dataclass(frozen=True)
class StoppingParams:
    max_new_tokens: int = 20
    stop: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "stop": list(self.stop)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoppingParams:
        return cls(max_new_tokens=int(d["max_new_tokens"]), stop=tuple(str(s) for s in d["stop"]))


JOB_VERSION = 3  # the newest job format this code writes and runs (see common.protocol)
CONSTRAINED_JOB_VERSION = 3  # a job with a `grammar`: a worker that predates constraints must refuse it
PLAIN_JOB_VERSION = 2  # a job without one, which the previous release's workers still run


@dataclass(frozen=True)
class GenerationJob:
    """One sequence to generate. best_of > 1 becomes several jobs with their own ids and seeds."""
    request_id: str
    input_ids: tuple[int, ...]
    sampling: SamplingParams
    stopping: StoppingParams
    reply_to: str  # pub/sub channel of the API process that waits for this job
    want_tokens: bool = False  # put every generated Token in the FinalEvent (non-stream details, best_of)
    want_prefill: bool = False  # compute prompt logprobs (non-stream details)
    attempt: int = 0  # incremented each time the job is re-run after a worker died
    enqueued_at: float = 0.0  # epoch seconds, set by the API
    # The output constraint as an llguidance grammar (common.grammars), or None: the worker masks every
    # token the grammar does not allow, from the first generated token on (a re-run starts it over).
    grammar: str | None = None
    # Job format version (common.protocol: JOB_VERSION); a job without "v" is a v1 job, from an API
    # of the previous release, which reads one event per message.
    version: int = PLAIN_JOB_VERSION

    def __post_init__(self) -> None:
        if self.grammar is not None and self.version < CONSTRAINED_JOB_VERSION:
            object.__setattr__(self, "version", CONSTRAINED_JOB_VERSION)

    def to_dict(self) -> dict[str, Any]:
        d = {"request_id": self.request_id, "input_ids": list(self.input_ids),
             "sampling": self.sampling.to_dict(), "stopping": self.stopping.to_dict(),
             "reply_to": self.reply_to, "want_tokens": self.want_tokens,
             "want_prefill": self.want_prefill, "attempt": self.attempt,
             "enqueued_at": self.enqueued_at, "v": self.version}
        if self.grammar is not None:
            d["grammar"] = self.grammar
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationJob:
        return cls(request_id=str(d["request_id"]), input_ids=tuple(int(i) for i in d["input_ids"]),
                   sampling=SamplingParams.from_dict(d["sampling"]),
                   stopping=StoppingParams.from_dict(d["stopping"]), reply_to=str(d["reply_to"]),
                   want_tokens=bool(d.get("want_tokens", False)),
                   want_prefill=bool(d.get("want_prefill", False)),
                   attempt=int(d.get("attempt", 0)), enqueued_at=float(d.get("enqueued_at", 0.0)),
                   grammar=str(d["grammar"]) if d.get("grammar") is not None else None,
                   version=int(d.get("v", 1)))


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float
    special: bool
    # The job's `top_n_tokens` most likely ids of the distribution this token was drawn from, most
    # likely first (each with its own logprob); empty unless the job asked for them.
    top: tuple[Token, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = {"id": self.id, "text": self.text, "logprob": self.logprob, "special": self.special}
        if self.top:
            d["top"] = [t.to_dict() for t in self.top]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Token:
        lp = d["logprob"]
        return cls(id=int(d["id"]), text=str(d["text"]), logprob=float("nan") if lp is None else float(lp),
                   special=bool(d["special"]), top=tuple(cls.from_dict(t) for t in d.get("top", ())))


@dataclass(frozen=True)
class PrefillToken:
    id: int
    text: str
    logprob: float | None  # None for the first prompt token

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "logprob": self.logprob}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrefillToken:
        return cls(id=int(d["id"]), text=str(d["text"]),
                   logprob=None if d["logprob"] is None else float(d["logprob"]))


@dataclass(frozen=True)
class TokenEvent:
    """A generated token that is not the last one. `index` counts from 0 within the request."""
    request_id: str
    attempt: int
    index: int
    token: Token


@dataclass(frozen=True)
class FinalEvent:
    """The last token of a request, with the whole result."""
    request_id: str
    attempt: int
    index: int
    token: Token
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None  # None when the worker decoded greedily (TGI reports null then)
    started_at: float  # epoch seconds when the job joined a batch
    finished_at: float
    tokens: tuple[Token, ...] = ()  # filled when job.want_tokens
    prefill: tuple[PrefillToken, ...] = ()  # filled when job.want_prefill


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed; `error_type` is TGI's (`generation`, `incomplete_generation`, ...)."""
    request_id: str
    attempt: int
    message: str
    error_type: str


Event = TokenEvent | FinalEvent | ErrorEvent
