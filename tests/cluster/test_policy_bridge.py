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
