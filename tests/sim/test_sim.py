import dataclasses

import numpy as np
import pytest

from raymoe.policies import Topology
from raymoe.sim import (
    DEEPSEEK_V3,
    MIXTRAL_8X7B,
    OLMOE_1B_7B,
    NodeSpec,
    SimulationError,
    lift_trace,
    simulate,
    step_time_error,
)
from tests.policies.tiny import tiny_trace

TINY = dataclasses.replace(OLMOE_1B_7B, name="tiny", num_layers=2, num_moe_layers=2,
                           num_experts=8, top_k=2)
SLOW_NET = NodeSpec(flops=1e12, memory_bandwidth=1e11, network_bandwidth=1e8)


def test_presets_match_published_sizes():
    assert OLMOE_1B_7B.expert_bytes == 12582912  # as in the trace metadata
    assert MIXTRAL_8X7B.expert_params == 3 * 4096 * 14336
    assert (DEEPSEEK_V3.num_experts, DEEPSEEK_V3.num_moe_layers, DEEPSEEK_V3.top_k) == (256, 58, 8)


def test_step_time_error_worked_example():
    errors = step_time_error({"step_s": 1.1, "expert_s": 0.45, "extra": 3},
                             {"step_s": 1.0, "expert_s": 0.5})
    assert errors["step_s"] == pytest.approx(0.1)
    assert errors["expert_s"] == pytest.approx(-0.1)
    assert errors["max_abs"] == pytest.approx(0.1)
    with pytest.raises(SimulationError, match="no stage appears in both"):
        step_time_error({"a": 1}, {"b": 1})


def test_one_node_has_no_network_time():
    out = simulate(tiny_trace(), "contiguous", Topology(1, 8), TINY, SLOW_NET,
                   batch_size=4, num_steps=5)
    assert out["dispatch_s"] == 0.0 and out["cross_node_bytes"] == 0.0
    assert out["step_s"] > 0


def test_locality_cuts_bytes_on_a_slow_network():
    trace = tiny_trace(num_sequences=8, num_tokens=30)
    kwargs = dict(batch_size=4, num_steps=20, warmup_tokens=2, cap_slack=0.0)
    blind = simulate(trace, "contiguous", Topology(2, 4), TINY, SLOW_NET, **kwargs)
    grouped = simulate(trace, "grouping", Topology(2, 4), TINY, SLOW_NET, **kwargs)
    assert grouped["cross_node_bytes"] < blind["cross_node_bytes"]
    assert grouped["step_s"] < blind["step_s"]


def test_mismatched_trace_says_to_lift():
    with pytest.raises(SimulationError, match="lift_trace"):
        simulate(tiny_trace(), "contiguous", Topology(2, 8), OLMOE_1B_7B, SLOW_NET)


def test_lift_keeps_top_k_distinct_and_is_deterministic():
    trace = tiny_trace()
    a, b = lift_trace(trace, 5, 32, seed=1), lift_trace(trace, 5, 32, seed=1)
    assert a.num_layers == 5 and a.num_experts == 32 and a.top_k == 2
    np.testing.assert_array_equal(a.sequences[0].experts, b.sequences[0].experts)
    for seq in a.sequences:
        assert (np.sort(seq.experts, -1)[..., 1:] != np.sort(seq.experts, -1)[..., :-1]).all()
        assert seq.experts.max() < 32
