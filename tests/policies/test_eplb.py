import numpy as np
import pytest

from raymoe.policies import Topology
from raymoe.policies.eplb import (
    balanced_packing,
    contiguous_plan,
    eplb_plan,
    rebalance_experts,
    replicate_experts,
)

# The worked example published with DeepSeek's EPLB (README), with its printed output.
WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                   [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
           [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_hierarchical_matches_published_example():
    phy2log, log2phy, logcnt = rebalance_experts(WEIGHT, 16, 4, 2, 8)
    np.testing.assert_array_equal(phy2log, PHY2LOG)
    np.testing.assert_array_equal(logcnt, [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
                                           [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]])
    for layer in range(2):  # log2phy is the inverse of phy2log
        for log in range(12):
            phys = log2phy[layer, log][log2phy[layer, log] >= 0]
            assert len(phys) == logcnt[layer, log]
            assert (phy2log[layer, phys] == log).all()


def test_global_form_when_groups_do_not_divide_hosts():
    phy2log, _, logcnt = rebalance_experts(WEIGHT, 16, 3, 2, 8)
    expected, _, _ = rebalance_experts(WEIGHT, 16, 1, 1, 8)
    np.testing.assert_array_equal(phy2log, expected)
    assert logcnt.sum(1).tolist() == [16, 16]


def test_replicate_experts_gives_slots_to_highest_load_per_replica():
    phy2log, rank, logcnt = replicate_experts(np.array([[6.0, 3.0, 2.0]]), 5)
    # 6 per replica is highest; then 6/2 = 3 ties with 3 and the lower id wins; then 2 each.
    assert phy2log.tolist() == [[0, 1, 2, 0, 0]]
    assert rank.tolist() == [[0, 0, 0, 1, 2]]
    assert logcnt.tolist() == [[3, 1, 1]]


def test_balanced_packing_equal_counts_heaviest_first():
    pack, rank = balanced_packing(np.array([[5.0, 4.0, 3.0, 2.0]]), 2)
    # 5 and 4 open the packs; 3 joins the lighter (4); 2 takes the last free seat.
    assert pack.tolist() == [[0, 1, 1, 0]]
    assert rank.tolist() == [[0, 0, 1, 1]]


@pytest.mark.parametrize("topology", [Topology(1, 12), Topology(4, 3), Topology(2, 40)],
                         ids=["one-node", "exact-fit", "more-slots-than-experts"])
def test_eplb_plan_valid(topology):
    plan = eplb_plan(WEIGHT.astype(float), topology)
    plan.check(topology)
    assert plan.num_physical == topology.num_slots


def test_zero_load_experts_still_placed():
    plan = eplb_plan(np.zeros((2, 12)), Topology(4, 4))
    assert (plan.logcnt >= 1).all() and plan.logcnt.sum() == 32


def test_contiguous_plan():
    plan = contiguous_plan(1, 8, Topology(4, 3))
    assert plan.phy2log.tolist() == [list(range(8))]
    assert plan.phy2node.tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]]
    plan.check(Topology(4, 3))
