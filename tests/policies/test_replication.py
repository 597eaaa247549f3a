import numpy as np
import pytest

from raymoe.policies import Topology
from raymoe.policies.eplb import eplb_plan
from raymoe.policies.replication import pack, refine, replica_counts, replication_plan


def node_sets(plan, topology):
    return [sorted(plan.phy2log[0][plan.phy2node[0] == n].tolist())
            for n in range(topology.num_nodes)]


def test_worked_example_equal_nodes():
    # load 6,3,2,1 on 2 nodes x 3 slots: the 2 spare slots go to 6 (6 per replica), then
    # to 3 (3 ties 6/2, and a third copy of expert 0 would exceed one per node).
    topology = Topology(2, 3)
    plan = replication_plan(np.array([[6.0, 3.0, 2.0, 1.0]]), topology, smoothing=0)
    assert plan.logcnt.tolist() == [[2, 2, 1, 1]]
    # heaviest first onto the earliest finisher: 3|3, then 2 -> node 0, 1.5 -> node 1,
    # the second 1.5 -> node 0 (node 1 has a copy), 1 -> node 1 (node 0 full): 6.5 | 5.5
    assert node_sets(plan, topology) == [[0, 1, 2], [0, 1, 3]]
    plan.check(topology)


def test_replica_counts_cap_at_one_per_node():
    assert replica_counts(np.array([10.0, 1.0]), 6, max_replicas=3).tolist() == [3, 3]


def test_refine_swaps_until_no_swap_helps():
    per_replica = np.array([4.0, 3.0, 2.0, 1.0])
    # node 0 holds 4+3 = 7, node 1 holds 2+1 = 3; swapping 4 and 2 (the first of the two
    # swaps that give 5 | 5) ends it.
    assert refine([[0, 1], [2, 3]], per_replica, np.ones(2)) == [[2, 1], [0, 3]]


def test_pack_prefers_fast_node_for_heavy_items():
    nodes = pack(np.array([8.0, 4.0, 2.0, 1.0]), np.ones(4, dtype=int), Topology(2, 2, (1, 3)))
    assert sorted(nodes[1]) == [0, 1]  # the fast node takes the two heaviest


def loads_finish(plan, load, topology):
    held = plan.replicas_on_node(topology.num_nodes)
    share = held / held.sum(2, keepdims=True)
    node_load = np.einsum("le,len->ln", load, share)
    return (node_load / topology.speed_array).max(1).mean()


@pytest.mark.parametrize("speeds", [None, (1, 1, 2, 2)], ids=["equal", "unequal"])
def test_not_worse_than_eplb_on_its_own_calibration(speeds):
    rng = np.random.default_rng(0)
    load = rng.zipf(1.5, size=(4, 32)).astype(float)
    topology = Topology(4, 10, speeds)
    ours = loads_finish(replication_plan(load, topology, smoothing=0), load, topology)
    theirs = loads_finish(eplb_plan(load, topology), load, topology)
    assert ours <= theirs + 1e-9
    if speeds:
        assert ours < 0.9 * theirs


@pytest.mark.parametrize("topology, load", [
    (Topology(1, 8), np.arange(8.0)[None]),
    (Topology(2, 40), np.arange(8.0)[None]),
    (Topology(2, 4), np.zeros((3, 8))),
], ids=["one-node", "more-slots-than-experts", "zero-load-experts"])
def test_edge_cases_give_valid_plans(topology, load):
    plan = replication_plan(load, topology)
    plan.check(topology)
    assert plan.num_physical == topology.num_slots
