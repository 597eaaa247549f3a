"""When a request is finished, and which text its user sees.

Checked after every new token, in this order (the first that holds wins):
1. EOS (unless `ignore_eos`) or a token of `stop_token_ids`: finish_reason "stop". The token stays in
   `token_ids` but adds no text.
2. A stop string in the detokenized output: "stop". The text ends just before the stop string, as
   in vLLM and the OpenAI API; while streaming, the last `len(longest stop string) - 1` characters
   are held back, so a stop string never leaks out half-written.
3. `max_tokens` generated, or the sequence reached the model's context: "length".
"""

from __future__ import annotations

from raymoe.engine.sampling_params import SamplingParams
from raymoe.engine.sequence import Sequence


class StopStrings:
    """Finds stop strings in a growing text and holds back a tail that may still become one."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.num_held = max(map(len, stop), default=1) - 1
        self.text = ""  # all text so far (cut at the stop string once found); kept only with stop strings
        self.num_emitted = 0  # characters of text already handed out

    def push(self, delta: str) -> tuple[str, bool]:
        """Add new text; return (text now safe to show, whether a stop string was found)."""
        if not self.stop:  # nothing to find or hold back: the text passes through
            return delta, False
        start = len(self.text)
        self.text += delta
        cut = self._find(start)
        if cut is not None:
            assert cut >= self.num_emitted, "a held-back tail is always longer than a stop string's head"
            self.text = self.text[:cut]
            return self.flush(), True
        return self._emit(len(self.text) - self.num_held), False

    def flush(self) -> str:
        """The rest of the text (the request finished for another reason)."""
        return self._emit(len(self.text))

    def _find(self, start: int) -> int | None:
        """Earliest stop string that ends in the text added at `start` or later."""
        found = [self.text.find(s, max(0, start - len(s) + 1)) for s in self.stop]
        return min((i for i in found if i >= 0), default=None)

    def _emit(self, end: int) -> str:
        end = max(end, self.num_emitted)
        out, self.num_emitted = self.text[self.num_emitted : end], end
        return out


class StopChecker:
    """One request's stop conditions and visible text.

    detokenizer: an `IncrementalDetokenizer` (`push(token_id) -> new text`), or None for a
    token-ids-only engine (then stop strings never match and the text stays empty).
    """

    def __init__(self, params: SamplingParams, eos_token_ids, max_model_len: int, detokenizer=None):
        self.params = params
        self.eos_token_ids = frozenset(() if params.ignore_eos else eos_token_ids)
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.max_model_len = max_model_len
        self.detokenizer = detokenizer
        self.stop_strings = StopStrings(params.stop)

    def check(self, seq: Sequence) -> tuple[str, str | None]:
        """After seq got a token: (new text to show, finish reason or None)."""
        token_id = seq.last_token
        if token_id in self.eos_token_ids or token_id in self.stop_token_ids:
            return self._flush(), "stop"
        text, is_stopped = self.stop_strings.push(self._decode(token_id))
        if is_stopped:
            return text, "stop"
        if seq.num_output_tokens >= self.params.max_tokens or len(seq) >= self.max_model_len:
            return text + self._flush(), "length"
        return text, None

    def _decode(self, token_id: int) -> str:
        return self.detokenizer.push(token_id) if self.detokenizer is not None else ""

    def _flush(self) -> str:
        """Text still held back: by the stop-string tail and by the detokenizer (a partial char)."""
        flush = getattr(self.detokenizer, "flush", None)
        text, is_stopped = self.stop_strings.push(flush() if flush else "")
        return text if is_stopped else text + self.stop_strings.flush()
