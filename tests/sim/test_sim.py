import dataclasses

import numpy as np
import pytest

from raymoe.policies import Topology
from raymoe.sim import (
    BUILTIN,
    DEEPSEEK_V3,
    MIXTRAL_8X7B,
    OLMOE_1B_7B,
    NodeSpec,
    SimulationError,
    lift_trace,
    simulate,
    step_breakdown,
    step_time_error,
)
from raymoe.sim.disaggregated import disaggregated_replay, measured_components, modelled_components, per_step_pairs
from raymoe.sim.models import from_model_spec
from tests.policies.tiny import tiny_trace

TINY = dataclasses.replace(OLMOE_1B_7B, name="tiny", num_layers=2, num_moe_layers=2, num_experts=8, top_k=2)
SLOW_NET = NodeSpec(flops=1e12, memory_bandwidth=1e11, network_bandwidth=1e8)


def test_presets_match_published_sizes():
    assert OLMOE_1B_7B.expert_bytes == 12582912  # as in the trace metadata
    assert MIXTRAL_8X7B.expert_params == 3 * 4096 * 14336
    assert (DEEPSEEK_V3.num_experts, DEEPSEEK_V3.num_moe_layers, DEEPSEEK_V3.top_k) == (256, 58, 8)


def test_step_time_error_worked_example():
    errors = step_time_error({"step_s": 1.1, "expert_s": 0.45, "extra": 3}, {"step_s": 1.0, "expert_s": 0.5})
    assert errors["step_s"] == pytest.approx(0.1)
    assert errors["expert_s"] == pytest.approx(-0.1)
    assert errors["max_abs"] == pytest.approx(0.1)
    with pytest.raises(SimulationError, match="no stage appears in both"):
        step_time_error({"a": 1}, {"b": 1})


def test_one_node_has_no_network_time():
    out = simulate(tiny_trace(), "contiguous", Topology(1, 8), TINY, SLOW_NET, batch_size=4, num_steps=5)
    assert out["dispatch_s"] == 0.0 and out["cross_node_bytes"] == 0.0
    assert out["step_s"] > 0


def test_locality_cuts_bytes_on_a_slow_network():
    trace = tiny_trace(num_sequences=8, num_tokens=30)
    kwargs = {"batch_size": 4, "num_steps": 20, "warmup_tokens": 2, "cap_slack": 0.0}
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


def test_builtin_preset_matches_the_builtin_model():
    from raymoe.model.builtin import random_model_path
    from raymoe.model.spec import load_spec

    spec = load_spec(random_model_path())
    assert from_model_spec(spec, BUILTIN.name, weight_bytes=4) == BUILTIN
    assert BUILTIN.expert_params == 3 * spec.hidden_size * spec.moe_intermediate_size
    assert (BUILTIN.num_moe_layers, BUILTIN.num_experts, BUILTIN.top_k) == (len(spec.moe_layer_ids), 16, 4)


def test_measured_and_modelled_components_compare_like_with_like():
    measured = measured_components(50.0, {"attention_and_local": 10.0, "dispatch": 25.0, "expert": 10.0,
                                          "combine": 5.0})  # fmt: skip
    assert measured == pytest.approx({"step_s": 0.05, "local_s": 0.015, "network_s": 0.025, "expert_s": 0.01})
    modelled = modelled_components({"step_s": 0.04, "attention_s": 0.01, "dense_and_head_s": 0.002,
                                    "dispatch_s": 0.01, "combine_s": 0.01, "expert_s": 0.008})  # fmt: skip
    errors = step_time_error(modelled, measured)
    assert errors["step_s"] == pytest.approx(-0.2)  # (40 - 50) / 50
    assert errors["local_s"] == pytest.approx(-0.2)  # (12 - 15) / 15
    assert errors["network_s"] == pytest.approx(-0.2) and errors["expert_s"] == pytest.approx(-0.2)
    assert errors["max_abs"] == pytest.approx(0.2)


def test_disaggregated_step_sends_every_pair_over_the_wire():
    pairs = per_step_pairs(np.arange(1, 33).reshape(2, 16), batch_size=8, top_k=4)
    assert pairs.sum(1) == pytest.approx([32, 32])
    shards = [[set(range(8)), set(range(8, 16))]] * 2
    replay, topology = disaggregated_replay(pairs, shards, batch_size=8)
    model = dataclasses.replace(BUILTIN, num_layers=2, num_moe_layers=2)
    out = step_breakdown(replay, model, SLOW_NET, topology, context_tokens=16)
    assert topology.num_nodes == 3 and out["cross_node_bytes"] == 2 * 2 * 32 * model.token_bytes
    assert out["dispatch_s"] == out["combine_s"] > 0
    assert out["step_s"] == pytest.approx(out["attention_s"] + 2 * out["dispatch_s"] + out["expert_s"]
                                          + out["dense_and_head_s"])  # fmt: skip
