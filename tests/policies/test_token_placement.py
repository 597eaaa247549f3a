import numpy as np
import pytest

from raymoe.policies import Topology, evaluate
from raymoe.policies.token_placement import (
    RequestPlacer,
    history_profiles,
    node_affinity,
    node_caps,
    place_requests,
    request_profiles,
)
from raymoe.policies.traces import DecodeBatches, SequenceTrace, Trace
from tests.policies.tiny import tiny_trace


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


def two_phase():
    """One request, one layer, top-1 of 2 experts: tokens 0-1 use expert 0, tokens 2-5
    expert 1; it runs alone, token t at step t."""
    experts = np.array([0, 0, 1, 1, 1, 1]).reshape(6, 1, 1)
    trace = Trace("two-phase", (SequenceTrace(experts, np.zeros(6, dtype=np.int64)),), 2)
    steps = np.arange(6)[:, None]
    b = DecodeBatches(experts[:, None], np.zeros((6, 1), dtype=np.int64), steps, np.array([0]))
    return trace, b


def test_history_profile_counts_tokens_decoded_before_the_step():
    trace, b = two_phase()
    profiles = history_profiles(trace, b)
    assert profiles(np.array([0]), 2).tolist() == [[[2.0, 0.0]]]  # tokens 0, 1
    assert profiles(np.array([0]), 5).tolist() == [[[2.0, 3.0]]]  # tokens 0-4
    assert profiles(np.array([], dtype=np.int64), 5).shape == (0, 1, 2)
    warmup = request_profiles(trace, b, "warmup", warmup_tokens=2)
    assert warmup(np.array([0]), 5).tolist() == [[[2.0, 0.0]]]  # frozen at the first 2
    with pytest.raises(ValueError, match="choose history or warmup"):
        request_profiles(trace, b, "oracle", 2)


def test_history_profile_rejects_requests_not_running():
    trace, b = two_phase()
    with pytest.raises(ValueError, match=r"requests \[1\] do not run at step 0"):
        history_profiles(trace, DecodeBatches(b.experts, b.request, b.position,
                                              np.array([0, 0])))(np.array([1]), 0)


def test_reseat_follows_the_history_not_the_warmup():
    # expert 0 lives on node 0, expert 1 on node 1. After its 2 warm-up tokens the request
    # sits on node 0 (both predictors see only expert 0). At the re-seat after step 5 it has
    # decoded tokens 0-4 (2 on expert 0, 3 on expert 1): the history moves it to node 1
    # (affinity 0.4 / 0.6), the frozen warm-up keeps it on node 0.
    trace, b = two_phase()
    replicas = np.array([[[1, 0], [0, 1]]])
    for kind, node in (("history", 1), ("warmup", 0)):
        profiles = request_profiles(trace, b, kind, warmup_tokens=2)

        def affinity(r, s, profiles=profiles):
            return node_affinity(profiles(r, s), replicas)

        placer = RequestPlacer(b, np.ones(2), warmup_tokens=2, cap_slack=1.0)
        assert [int(placer.step(t, affinity)[0]) for t in range(6)] == [0] * 6
        assert affinity(np.array([0]), 5).tolist() == [[1.0, 0.0] if kind == "warmup"
                                                      else [0.4, 0.6]]
        assert placer.reseat(5, affinity) == node
        assert placer.state.node[0] == node


def test_request_profile_leaves_routing_blind_policies_alone():
    kwargs = {"batch_size": 4, "num_steps": 12, "replan_every": 4}
    for policy in ("contiguous", "replication"):
        a = evaluate(tiny_trace(), policy, Topology(2, 6), request_profile="history", **kwargs)
        b = evaluate(tiny_trace(), policy, Topology(2, 6), request_profile="warmup", **kwargs)
        assert a == b


def test_seat_requests_most_decided_first_under_caps():
    from raymoe.policies.token_placement import seat_requests

    affinity = np.array([[0.6, 0.4], [0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    count = np.array([1, 0])
    seats = seat_requests(affinity, count, caps=np.array([2, 3]))
    # request 1 (margin 0.8) takes worker 0's last seat; request 0 then finds it full
    assert seats.tolist() == [1, 0, 1, 1]
    assert count.tolist() == [2, 3]
    assert seat_requests(np.array([[1.0, 0.0]]), count, np.array([2, 3])).tolist() == [0]  # all full


def test_reseat_requests_swaps_under_caps_when_the_gain_beats_the_move():
    from raymoe.policies.token_placement import reseat_requests

    # both workers full (cap 1): the two requests sit on each other's best worker and swap
    affinity = np.array([[0.2, 0.8], [0.9, 0.1]])
    assert reseat_requests(affinity, np.array([0, 1]), np.array([1, 1]), 0.1).tolist() == [1, 0]
    # gains 0.6 and 0.8 against 0.7: request 0 stays, request 1 moves (caps are soft here)
    assert reseat_requests(affinity, np.array([0, 1]), np.array([1, 1]), 0.7).tolist() == [0, 0]
    assert reseat_requests(affinity, np.array([1, 0]), np.array([1, 1]), 0.0).tolist() == [1, 0]  # already best
