"""A registry policy's plan becomes a Placement over the controller's shards (no Ray needed)."""

import numpy as np
import pytest

from raymoe.cluster.placement import Placement, contiguous_placement
from raymoe.cluster.policy_bridge import plan_placement
from raymoe.errors import ConfigError


def current() -> Placement:
    # 3 shards on 2 nodes: node "a" (speed 1) holds shard 0, node "b" (speed 2) shards 1 and 2
    return contiguous_placement([0, 1], 8, ["a", "b", "b"])


def test_replication_policy_covers_every_expert_and_replicates_the_hot_one():
    load = np.ones((2, 8))
    load[1, 3] = 50.0  # layer 1, expert 3 is hot
    p = plan_placement("replication", load, [0, 1], current(), {"a": 1.0, "b": 2.0}, extra_replicas=2)
    p.check_covers([0, 1], 8)
    assert len(p.shards_for(1, 3)) == 2
    on_b = sum(len(p.experts_on(s)) for s in (1, 2))
    assert on_b > len(p.experts_on(0))  # the faster node holds more


@pytest.mark.parametrize("policy", ["contiguous", "eplb_global", "replication"])
def test_every_policy_gives_a_valid_placement(policy):
    p = plan_placement(policy, np.arange(16.0).reshape(2, 8) + 1, [0, 1], current(), {"a": 1, "b": 1}, 2)
    p.check_covers([0, 1], 8)
    assert p.shard_nodes == current().shard_nodes


def test_unknown_policy_is_a_config_error():
    from raymoe.cluster.controller import _checked_policy

    with pytest.raises(ConfigError, match="unknown"):
        _checked_policy("fastest")


def test_grouping_places_live_requests_experts_on_their_node():
    """Live request profiles reach the grouping policies: two kinds of request, one on each node,
    each using one half of the experts; each node ends up holding its requests' half."""
    from raymoe.cluster.policy_bridge import request_calibration
    from raymoe.cluster.seating import held_on_nodes
    from raymoe.policies.token_placement import node_affinity

    profiles = np.zeros((8, 2, 8))
    profiles[:4, :, :4], profiles[4:, :, 4:] = 0.5, 0.5
    nodes = ["a"] * 4 + ["b"] * 4
    assert request_calibration(np.ones((2, 8)), profiles, nodes, ["a", "b"]).request_node.tolist() == [0] * 4 + [1] * 4
    assert request_calibration(np.ones((2, 8)), profiles, ["a"] * 7 + ["gone"], ["a", "b"]).request_node is None
    load = profiles.sum(0)
    p = plan_placement("regrouping", load, [0, 1], current(), {"a": 1, "b": 1}, 0, profiles, nodes)
    p.check_covers([0, 1], 8)
    affinity = node_affinity(profiles, held_on_nodes(p, [0, 1], 8, ["a", "b"]))
    blind = plan_placement("regrouping", load, [0, 1], current(), {"a": 1, "b": 1}, 0)
    blind_affinity = node_affinity(profiles, held_on_nodes(blind, [0, 1], 8, ["a", "b"]))
    own = affinity[np.arange(8), [0] * 4 + [1] * 4]
    assert own.mean() > 0.9 > blind_affinity[np.arange(8), [0] * 4 + [1] * 4].mean()
