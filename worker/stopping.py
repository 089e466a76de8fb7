"""TGI's per-token stopping rules (§9.5): length first, then EOS, then stop strings as a suffix."""
from __future__ import annotations

from common.schemas import FinishReason


class StoppingCriteria:
    """Decides after each generated token whether a sequence is done, and why."""

    def __init__(self, eos_token_id: int | None, max_new_tokens: int, stop: tuple[str, ...] = ()) -> None:
        self.eos_token_id = eos_token_id
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(stop)
        # `re.search(escape(s) + "$")` only ever looks at the end (or just before a final "\n"), so the
        # accumulated text can be trimmed to the longest stop string plus that newline: same answers.
        self._keep = max((len(s) for s in self.stop), default=0) + 1
        self.current_tokens = 0
        self.current_output = ""

    def __call__(self, token_id: int, token_text: str) -> tuple[bool, FinishReason | None]:
        """Account one token and its incremental text; returns (done, reason)."""
        self.current_tokens += 1
        if self.current_tokens >= self.max_new_tokens:
            return True, FinishReason.LENGTH
        if self.eos_token_id is not None and token_id == self.eos_token_id:
            return True, FinishReason.EOS_TOKEN
        if not self.stop:
            return False, None
        self.current_output = (self.current_output + token_text)[-self._keep:]
        text = self.current_output
        for s in self.stop:
            # Python's `$` also matches just before a trailing "\n"; "" matches at once.
            if text.endswith(s) or text.endswith(s + "\n"):
                return True, FinishReason.STOP_SEQUENCE
        return False, None
