"""Replica counts from load signals: the most demanding signal decides; an override wins."""

import pytest

from raymoe.policies.scaling import desired_replicas, signal_demand


@pytest.mark.parametrize(
    "signals, targets, current, expected",
    [
        ({"queued_prompt_tokens": 5000.0}, {"queued_prompt_tokens": 2048.0}, 1, 3),
        ({"queued_prompt_tokens": 4096.0}, {"queued_prompt_tokens": 2048.0}, 1, 2),  # exactly at target
        ({"queued_prompt_tokens": 0.0}, {"queued_prompt_tokens": 2048.0}, 2, 0),  # idle: bounds clamp later
        ({"running_sequences": 10.0, "kv_block_fraction": 0.9}, {"running_sequences": 16.0,
                                                                   "kv_block_fraction": 0.6}, 2, 3),
        ({"running_sequences": 40.0, "kv_block_fraction": 0.1}, {"running_sequences": 16.0,
                                                                   "kv_block_fraction": 0.8}, 1, 3),
    ],
    ids=["tokens", "at-target", "idle", "kv-wins", "sequences-win"],
)  # fmt: skip
def test_most_demanding_signal_decides(signals, targets, current, expected):
    decision = desired_replicas(signals, targets, current)
    assert decision.num_replicas == expected
    winner = max(signals, key=lambda n: signal_demand(n, signals[n], targets[n], current))
    assert decision.reason.startswith(winner)


def test_override_and_missing_signals():
    assert desired_replicas({"running_sequences": 99.0}, {"running_sequences": 1.0}, 1, override=2).num_replicas == 2
    keep = desired_replicas({"unrelated": 5.0}, {"running_sequences": 4.0}, current=3)
    assert keep.num_replicas == 3 and "no load" in keep.reason


def test_bad_target_is_rejected():
    with pytest.raises(ValueError, match="target for running_sequences"):
        signal_demand("running_sequences", 1.0, 0.0, 1)


@pytest.mark.parametrize(
    "sequences, current, expected",
    [(3.7, 2, 2), (3.2, 2, 1), (2.0, 3, 1), (9.0, 3, 3)],
    ids=["near-boundary-kept", "under-80pct-down", "idle-down", "full-kept"],
)
def test_scale_down_leaves_headroom(sequences, current, expected):
    decision = desired_replicas({"running_sequences": sequences}, {"running_sequences": 4.0}, current)
    assert decision.num_replicas == expected
    assert ("kept at" in decision.reason) == (expected == current and sequences / 4.0 <= current - 1)
