import numpy as np

from raymoe.policies import Topology
from raymoe.policies.evaluate import experts_moved
from raymoe.policies.plan import plan_from_node_lists
from raymoe.policies.replan import align, anchors, incremental_plan, load_drift, rebalance, refill


def test_anchor_keeps_sole_copies_and_prefers_demand():
    held = np.array([[1, 0], [1, 1], [0, 1]])  # expert 1 has copies on both nodes
    demand = np.array([[1, 0], [0, 5], [0, 1]], float)
    assert anchors(held, demand).tolist() == [0, 1, 1]


def test_refill_takes_each_node_most_demanded():
    demand = np.array([[9, 8], [0, 1], [7, 0]], float)
    # node 0 keeps its anchor 0 and adds 2 (its demand 7); node 1 is full with its anchors
    assert refill(np.array([0, 1, 1]), demand, 2) == [[0, 2], [1, 2]]


def test_rebalance_swaps_single_copies_off_the_busy_node():
    demand = np.array([[4, 0], [3, 0], [1, 0], [0, 0]], float)  # all demand from node 0
    nodes = rebalance([[0, 1], [2, 3]], demand, np.ones(2), max_swaps=1)
    assert sorted(map(sorted, nodes)) == [[0, 3], [1, 2]]  # 4 | 3+1


def test_incremental_plan_moves_at_most_the_spare_slots():
    topology = Topology(2, 3)
    current = plan_from_node_lists([[[0, 1, 2], [2, 3, 0]]], topology, 4)
    demand = np.array([[[0, 3], [0, 3], [1, 0], [0, 0]]], float)
    new = incremental_plan(current, demand, topology, max_swaps=0)
    new.check(topology)
    assert experts_moved([current, new], 2) <= 2


def test_align_relabels_nodes_to_keep_copies():
    topology = Topology(2, 2)
    current = plan_from_node_lists([[[0, 1], [2, 3]]], topology, 4)
    swapped = plan_from_node_lists([[[2, 3], [0, 1]]], topology, 4)
    assert experts_moved([current, swapped], 2) == 4
    assert experts_moved([current, align(current, swapped, topology)], 2) == 0


def test_load_drift():
    assert load_drift(np.array([[1.0, 1.0]]), np.array([[2.0, 2.0]])) == 0.0
    assert load_drift(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])) == 1.0
