import pytest

from raymoe.policies.microbatch import MicrobatchError, choose_microbatches, pipelined_time


@pytest.mark.parametrize("m, expected", [(1, 3.0), (2, 2.5), (4, 2.25)])
def test_pipelined_time_two_stage(m, expected):
    # attention 1 s, expert round trip 2 s: time = max + min / m, the longer stage hides
    # all but one microbatch's share of the shorter.
    assert pipelined_time(1.0, 2.0, m) == pytest.approx(expected)


def test_fixed_costs_repeat_per_microbatch():
    assert pipelined_time(1.0, 1.0, 2, 0.5, 0.5) == pytest.approx(1.0 + 1.0 + 1.0)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(attention_s=1.0, expert_rtt_s=1.0, batch_size=64), 3),
    (dict(attention_s=1.0, expert_rtt_s=0.01, batch_size=64), 1),
    (dict(attention_s=1.0, expert_rtt_s=1.0, batch_size=1), 1),
    (dict(attention_s=0.1, expert_rtt_s=0.1, batch_size=64, expert_fixed_s=0.5), 1),
], ids=["balanced-stages", "expert-negligible", "batch-of-one", "fixed-cost-dominates"])
def test_choose_microbatches(kwargs, expected):
    assert choose_microbatches(**kwargs) == expected


def test_negative_time_rejected():
    with pytest.raises(MicrobatchError, match="attention_s=-1"):
        choose_microbatches(-1.0, 1.0, 8)
