from typing import get_args

import numpy as np
import pytest

from raymoe.errors import ConfigError
from raymoe.policies import REGISTRY, PolicyName, Topology, evaluate, get_policy, load_domains
from tests.policies.tiny import OLMOE, needs_traces, tiny_trace


def test_registry_matches_literal():
    assert set(REGISTRY) == set(get_args(PolicyName))


def test_unknown_policy_lists_names():
    with pytest.raises(ConfigError, match="choose one of contiguous"):
        get_policy("nope")


@pytest.mark.parametrize("policy", sorted(REGISTRY))
def test_one_node_is_all_local_and_balanced(policy):
    out = evaluate(tiny_trace(), policy, Topology(1, 8), batch_size=4, num_steps=6)
    assert out["local_activation_rate"] == 1.0
    assert out["max_over_mean"] == 1.0


def test_contiguous_blind_placement_worked_example():
    # 2 nodes, experts 0-3 on node 0 and 4-7 on node 1; even sequences use only 0-3,
    # odd only 4-7. Blind placement alternates nodes, so half the pairs are local.
    out = evaluate(tiny_trace(), "contiguous", Topology(2, 4), batch_size=2, num_steps=5,
                   seed=3)
    assert out["local_activation_rate"] + out["cross_node_share"] == 1.0
    assert out["num_plans"] == 1 and out["experts_moved"] == 0


def test_grouping_finds_the_camps():
    trace = tiny_trace(num_sequences=8, num_tokens=30)
    # a cap of the whole batch per node lets every request sit with its camp
    out = evaluate(trace, "grouping", Topology(2, 4), batch_size=4, num_steps=20,
                   warmup_tokens=2, cap_slack=1.0)
    blind = evaluate(trace, "contiguous", Topology(2, 4), batch_size=4, num_steps=20)
    assert out["local_activation_rate"] > 0.8 > blind["local_activation_rate"]


@pytest.mark.parametrize("policy", ["replication", "placement", "regrouping"])
def test_replanning_reports_moves(policy):
    out = evaluate(tiny_trace(), policy, Topology(2, 6), batch_size=4, num_steps=12,
                   replan_every=4)
    assert out["num_plans"] == 3
    assert out["experts_moved"] >= 0 and out["requests_migrated"] >= 0


@needs_traces
def test_real_trace_cross_domain_smoke():
    domains = load_domains(OLMOE)
    out = evaluate(domains["coding"], "placement", Topology(4, 20),
                   calibration=domains["general"], batch_size=64, num_steps=8)
    assert out["calibration"] == "general" and out["trace"] == "coding"
    assert 0.25 < out["local_activation_rate"] < 1.0
    assert np.isfinite(out["max_over_mean"])


def test_replan_at_a_live_schedule_and_reseat_gain():
    """`replan_at` [4, 8] is `replan_every` 4; another schedule plans elsewhere; a reseat gain
    keeps the requests whose move would gain less (the live front's rule)."""
    kwargs = {"batch_size": 4, "num_steps": 12}
    every = evaluate(tiny_trace(), "regrouping", Topology(2, 6), replan_every=4, **kwargs)
    assert evaluate(tiny_trace(), "regrouping", Topology(2, 6), replan_at=[4, 8], **kwargs) == every
    assert evaluate(tiny_trace(), "regrouping", Topology(2, 6), replan_at=[7], **kwargs)["num_plans"] == 2
    trace, kwargs = tiny_trace(num_sequences=8, num_tokens=30), {**kwargs, "warmup_tokens": 2, "replan_every": 3}
    moves = [evaluate(trace, "regrouping", Topology(2, 6), reseat_gain=g, **kwargs)["requests_migrated"]
             for g in (0.0, 0.3, 0.9)]  # fmt: skip
    assert moves == sorted(moves, reverse=True) and moves[0] > moves[-1] == 0
