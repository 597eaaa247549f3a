import numpy as np

from raymoe.policies import Topology
from raymoe.policies.grouping import (
    add_replicas,
    balanced_assign,
    base_slot_counts,
    cocluster,
    grouping_plan,
)


def test_base_slot_counts_follow_speed_within_slots():
    assert base_slot_counts(8, Topology(2, 6)).tolist() == [4, 4]
    assert base_slot_counts(8, Topology(2, 6, (1, 3))).tolist() == [2, 6]
    assert base_slot_counts(8, Topology(2, 5, (1, 3))).tolist() == [3, 5]


def test_balanced_assign_clearest_choice_first():
    scores = np.array([[0.9, 0.1], [0.6, 0.5], [0.8, 0.0]])
    # request 2 (margin .8) and 0 (.8, later) both want node 0; cap 2 leaves request 1 node 1
    assert balanced_assign(scores, np.array([2, 2])).tolist() == [0, 1, 0]


def test_add_replicas_fills_with_own_demand():
    affinity = np.array([[5, 5], [4, 0], [0, 3], [1, 1]], float)
    assert add_replicas([[0, 1], [2, 3]], affinity, 3) == [[0, 1, 3], [2, 3, 0]]


def two_camps(num_requests=8):
    """Half the requests use experts 0-3, half 4-7, at both layers."""
    profiles = np.zeros((num_requests, 2, 8))
    for r in range(num_requests):
        profiles[r, :, (r % 2) * 4:(r % 2) * 4 + 4] = 0.5
    return profiles


def test_cocluster_separates_the_camps():
    profiles = two_camps()
    load = profiles.sum(0)
    node_experts, request_node = cocluster(profiles, load, Topology(2, 4))
    for layer in node_experts:
        assert sorted(map(sorted, layer)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # each camp sits on the node of its experts
    assert len(set(request_node[::2])) == 1 and len(set(request_node[1::2])) == 1
    assert request_node[0] != request_node[1]


def test_grouping_plan_valid_with_replicas_and_one_node():
    profiles = two_camps()
    for topology in (Topology(2, 6), Topology(1, 8), Topology(2, 20)):
        plan = grouping_plan(profiles, profiles.sum(0), topology)
        plan.check(topology)
        assert plan.num_physical == topology.num_slots
