"""The decode deployment's request router ranks replicas by their node's share of the request's
predicted experts, and puts replicas at their cap last."""

from types import SimpleNamespace

import numpy as np

from raymoe.cluster.placement import Placement
from raymoe.serve.expert_router import ExpertAffinityRouter, _routing


def router(queue: dict) -> ExpertAffinityRouter:
    r = ExpertAffinityRouter.__new__(ExpertAffinityRouter)  # Serve builds it with its own handles
    r.initialize_state()
    r._replica_queue_len_cache = queue
    return r


def test_ranks_by_share_of_predicted_experts_held_on_the_node():
    # one MoE layer, 4 experts; shard 0 on node a holds experts 0, 1; shard 1 on node b holds 2, 3
    placement = Placement(1, ("s0", "s1"), ("a", "b"), {(0, 0): (0,), (0, 1): (0,), (0, 2): (1,), (0, 3): (1,)})
    replicas = [SimpleNamespace(node_id=n, replica_id=i) for i, n in enumerate(["a", "b", "b"])]
    routing = np.array([[1, 0, 3, 2]])  # 5 of 6 pairs on node b's experts
    ranks = router({0: 0, 1: 0, 2: 0}).rank(replicas, routing, placement)
    assert [[r.replica_id for r in rank] for rank in ranks] == [[1, 2], [0]]
    # replica 1 holds 2 of the 4 running requests (cap: ceil(5 / 3 * 1.1) = 2): last
    ranks = router({0: 0, 1: 2, 2: 1}).rank(replicas, routing, placement)
    assert [[r.replica_id for r in rank] for rank in ranks] == [[2], [0], [1]]


def test_requests_without_routing_rank_alike():
    pending = SimpleNamespace(args=[SimpleNamespace(routing=None)])
    assert _routing(pending) is None and _routing(None) is None
    pending = SimpleNamespace(args=[SimpleNamespace(routing=[[1, 2]])])
    assert _routing(pending).tolist() == [[1, 2]]
