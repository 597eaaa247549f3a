"""Microbatch sizing: split a decode batch so one part's expert round trip hides behind
another part's attention (ping-pong pipelining).

Per MoE layer, a batch spends `attention_s` in attention (and router) and `expert_rtt_s`
in the expert round trip (dispatch, expert FFNs, combine). With m microbatches the two
stages overlap as a two-stage pipeline:
    stage_a = attention_s / m + attention_fixed_s      (per microbatch)
    stage_e = expert_rtt_s / m + expert_fixed_s        (per microbatch)
    time(m) = stage_a + stage_e + (m - 1) * max(stage_a, stage_e)
The fixed parts do not shrink with m: kernel launches, message latency, and in decode
the expert weights each microbatch has to read again. They are why a small batch gains
nothing from splitting.
"""

from __future__ import annotations

from raymoe.errors import RaymoeError


class MicrobatchError(RaymoeError, ValueError):
    """Timings that cannot size microbatches; the message says what to fix."""


def pipelined_time(attention_s: float, expert_rtt_s: float, num_microbatches: int,
                   attention_fixed_s: float = 0.0, expert_fixed_s: float = 0.0) -> float:
    """Modelled seconds per MoE layer for `num_microbatches` microbatches."""
    m = num_microbatches
    stage_a = attention_s / m + attention_fixed_s
    stage_e = expert_rtt_s / m + expert_fixed_s
    return stage_a + stage_e + (m - 1) * max(stage_a, stage_e)


def choose_microbatches(attention_s: float, expert_rtt_s: float, batch_size: int, *,
                        attention_fixed_s: float = 0.0, expert_fixed_s: float = 0.0,
                        max_microbatches: int = 4, min_tokens: int = 1,
                        min_gain: float = 0.05) -> int:
    """The microbatch count with the lowest modelled time, from measured per-layer times.

    attention_s, expert_rtt_s: measured for the whole batch of `batch_size` tokens.
    A split must save at least `min_gain` (a share of the unsplit time) over the next
    smaller count to be worth its complexity; each microbatch keeps >= `min_tokens` tokens.
    """
    for name, value in (("attention_s", attention_s), ("expert_rtt_s", expert_rtt_s),
                        ("attention_fixed_s", attention_fixed_s),
                        ("expert_fixed_s", expert_fixed_s)):
        if not value >= 0:
            raise MicrobatchError(f"{name}={value!r}: give a measured time in seconds, >= 0")
    if batch_size < 1 or max_microbatches < 1 or min_tokens < 1:
        raise MicrobatchError("batch_size, max_microbatches and min_tokens must all be >= 1")
    limit = max(1, min(max_microbatches, batch_size // min_tokens))
    times = [pipelined_time(attention_s, expert_rtt_s, m, attention_fixed_s, expert_fixed_s)
             for m in range(1, limit + 1)]
    best = 1
    for m in range(2, limit + 1):
        if times[best - 1] - times[m - 1] >= min_gain * times[0]:
            best = m
    return best
