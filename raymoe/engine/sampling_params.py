"""SamplingParams: how one request picks its tokens and when it stops.

Validated once on construction, then frozen. A value out of range raises `InvalidSamplingParams`
naming the field and its valid range, so an HTTP front end can hand the message straight back.
"""

from __future__ import annotations

from dataclasses import dataclass

from raymoe.engine.chunks import ChunkReuse
from raymoe.errors import InvalidSamplingParams

MAX_LOGPROBS = 20  # top logprobs per token at most (as OpenAI's chat API)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (argmax); higher flattens the distribution
    top_k: int = -1  # keep the k most likely tokens; -1 or 0 = off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p; 1 = off
    seed: int | None = None  # per-request RNG: the same seed gives the same tokens, whatever the batch
    max_tokens: int = 16  # generated tokens at most (finish_reason "length")
    stop: tuple[str, ...] = ()  # stop strings; the returned text ends before the first one found
    stop_token_ids: tuple[int, ...] = ()  # token ids that end the request (finish_reason "stop")
    ignore_eos: bool = False  # keep generating past EOS (benchmarks with fixed output lengths)
    n: int = 1  # samples of the prompt (each with its own output; they share the prompt's KV blocks)
    # Logit adjustments, in this order (raymoe.engine.logits_process), as vLLM applies them:
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), bias in [-100, 100]
    min_tokens: int = 0  # EOS and stop_token_ids are barred until this many tokens are generated
    repetition_penalty: float = 1.0  # > 1 discourages any token of the prompt or output (divides its logit)
    presence_penalty: float = 0.0  # in [-2, 2], subtracted once from every token already generated
    frequency_penalty: float = 0.0  # in [-2, 2], subtracted per time a token was generated
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one (after temperature)
    logprobs: int | None = None  # report the sampled token's logprob and the top-N; None = off
    prompt_logprobs: int | None = None  # the same for each prompt token (the first has none); None = off
    # Reuse cached KV of these prompt spans at any position (approximate; off by default):
    # a `raymoe.engine.chunks.ChunkReuse`. Not sampling, but it travels with the request everywhere.
    chunk_reuse: ChunkReuse | None = None

    def __post_init__(self):
        _check_number("temperature", self.temperature, ">= 0", lambda v: v >= 0)
        _check_int("top_k", self.top_k, "-1 or 0 (off) or >= 1", lambda v: v >= -1)
        _check_number("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        if self.seed is not None:
            _check_int("seed", self.seed, "in [0, 2**64) or None", lambda v: 0 <= v < 2**64)
        _check_int("max_tokens", self.max_tokens, ">= 1", lambda v: v >= 1)
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _token_ids(self.stop_token_ids))
        if not isinstance(self.ignore_eos, bool):
            raise InvalidSamplingParams(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        _check_int("n", self.n, ">= 1", lambda v: v >= 1)
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        _check_int("min_tokens", self.min_tokens, ">= 0", lambda v: v >= 0)
        _check_number("repetition_penalty", self.repetition_penalty, "> 0", lambda v: v > 0)
        _check_number("presence_penalty", self.presence_penalty, "in [-2, 2]", lambda v: -2 <= v <= 2)
        _check_number("frequency_penalty", self.frequency_penalty, "in [-2, 2]", lambda v: -2 <= v <= 2)
        _check_number("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), f"in [0, {MAX_LOGPROBS}] or None", lambda v: 0 <= v <= MAX_LOGPROBS)
        if self.chunk_reuse is not None and not isinstance(self.chunk_reuse, ChunkReuse):
            raise InvalidSamplingParams(f"chunk_reuse must be a ChunkReuse or None, got {self.chunk_reuse!r:.80}")

    @property
    def adjusts_logits(self) -> bool:
        """Whether any logit adjustment applies (else the logits go to the sampler untouched)."""
        return bool(self.logit_bias or self.min_tokens or self.repetition_penalty != 1
                    or self.presence_penalty or self.frequency_penalty)  # fmt: skip

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_number(name: str, v, valid: str, ok) -> None:
    if not (_is_int(v) or isinstance(v, float)) or v != v or not ok(v):
        raise InvalidSamplingParams(f"{name} must be {valid}, got {v!r}")


def _check_int(name: str, v, valid: str, ok) -> None:
    if not _is_int(v) or not ok(v):
        raise InvalidSamplingParams(f"{name} must be an integer {valid}, got {v!r}")


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = (stop,) if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise InvalidSamplingParams(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return tuple(items)


def _token_ids(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
        raise InvalidSamplingParams(f"stop_token_ids must be a list of token ids (integers >= 0), got {ids!r}")
    return tuple(ids)



def _logit_bias(bias) -> tuple[tuple[int, float], ...]:
    """A {token id: bias} dict or (id, bias) pairs -> sorted pairs; bias in [-100, 100]."""
    if bias is None:
        return ()
    items = bias.items() if isinstance(bias, dict) else bias
    try:
        pairs = tuple(sorted((t, b) for t, b in items))
    except (TypeError, ValueError):
        raise InvalidSamplingParams(f"logit_bias must map token ids to numbers, got {bias!r:.80}") from None
    for t, b in pairs:
        if not _is_int(t) or t < 0 or not (_is_int(b) or isinstance(b, float)) or not -100 <= b <= 100:
            raise InvalidSamplingParams(f"logit_bias must map token ids (integers >= 0) to numbers in "
                                        f"[-100, 100], got {t!r}: {b!r}")  # fmt: skip
    return tuple((t, float(b)) for t, b in pairs)
