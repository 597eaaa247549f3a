import numpy as np

from raymoe.policies.token_placement import RequestPlacer, node_affinity, node_caps, place_requests
from raymoe.policies.traces import DecodeBatches


def test_node_affinity_is_share_of_predicted_pairs():
    profiles = np.array([[[3.0, 1.0, 0.0]]])  # one request, one layer, three experts
    replicas = np.array([[[1, 0], [0, 1], [1, 1]]])  # [layer, expert, node]
    np.testing.assert_allclose(node_affinity(profiles, replicas), [[0.75, 0.25]])


def test_node_caps_follow_speed():
    assert node_caps(8, np.array([1.0, 3.0]), 0.0).tolist() == [2, 6]
    assert node_caps(8, np.array([1.0, 1.0]), 0.25).tolist() == [5, 5]


def batches(request, position):
    request, position = np.array(request), np.array(position)
    experts = np.zeros(request.shape + (1, 1), dtype=np.int64)
    return DecodeBatches(experts, request, position, np.arange(request.max() + 1))


def test_routing_blind_goes_to_least_loaded():
    b = batches([[0, 1, 2, 3]], [[9, 9, 9, 9]])
    assert place_requests(b, np.ones(2), None).tolist() == [[0, 1, 0, 1]]


def test_request_moves_after_warmup_to_its_node_under_cap():
    # request 0 starts at token 0 on the least-loaded node, then at token 2 is placed by its
    # affinity (node 1). Request 1 wants node 1 too, but the cap (1 per node) is taken.
    b = batches([[0, 1], [0, 1], [0, 1]], [[0, 5], [1, 6], [2, 7]])
    wants_node_1 = lambda requests, step: np.tile([0.0, 1.0], (len(requests), 1))  # noqa: E731
    nodes = place_requests(b, np.ones(2), wants_node_1, warmup_tokens=2, cap_slack=0.0)
    assert nodes.tolist() == [[0, 1], [0, 1], [0, 1]]
    b = batches([[0, 1], [0, 1], [0, 1]], [[0, 0], [1, 1], [2, 2]])
    nodes = place_requests(b, np.ones(2), wants_node_1, warmup_tokens=2, cap_slack=0.0)
    # both are ready at token 2 and both want node 1, which request 1 holds: it stays, and
    # request 0 finds no room there.
    assert nodes.tolist() == [[0, 1], [0, 1], [0, 1]]


def test_reseat_counts_moves():
    b = batches([[0, 1]], [[5, 5]])
    placer = RequestPlacer(b, np.ones(2), warmup_tokens=2, cap_slack=0.0)
    placer.step(0, lambda r, s: np.tile([1.0, 0.0], (len(r), 1)))
    flipped = lambda r, s: np.array([[0.0, 1.0], [1.0, 0.0]])  # noqa: E731
    assert placer.state.node[[0, 1]].tolist() == [0, 1]
    assert placer.reseat(0, flipped) == 2
    assert placer.state.node[[0, 1]].tolist() == [1, 0]
