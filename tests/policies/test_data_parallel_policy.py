"""assign_requests: greedy longest-first split of a batch between data-parallel engine replicas."""

import pytest

from raymoe.policies.data_parallel import assign_requests, replica_loads


def test_worked_example():
    # costs 10, 3, 7, 6, 2 on 2 replicas, longest first: 10 -> r0, 7 -> r1, 6 -> r1 (7 < 10),
    # 3 -> r0 (10 < 13), 2 -> r0 (13 = 13: the lower replica); loads 15 and 13
    costs = [10, 3, 7, 6, 2]
    plan = assign_requests(costs, 2)
    assert plan == [[0, 1, 4], [2, 3]]
    assert replica_loads(costs, plan) == [15, 13]


@pytest.mark.parametrize("num_replicas", [1, 2, 3, 5])
def test_every_request_once_in_order_and_balanced(num_replicas):
    costs = [(i * 37) % 251 + 4 for i in range(96)]
    plan = assign_requests(costs, num_replicas)
    assert sorted(i for indices in plan for i in indices) == list(range(96))
    assert all(indices == sorted(indices) for indices in plan)
    loads = replica_loads(costs, plan)
    assert max(loads) - min(loads) <= max(costs)  # LPT: within one request of even


@pytest.mark.parametrize(
    "costs, num_replicas, plan",
    [
        pytest.param([], 2, [[], []], id="no-requests"),
        pytest.param([5], 3, [[0], [], []], id="fewer-requests-than-replicas"),
        pytest.param([4, 4, 4, 4], 2, [[0, 2], [1, 3]], id="equal-costs-alternate"),
        pytest.param([100, 1, 1, 1], 2, [[0], [1, 2, 3]], id="one-giant"),
    ],
)
def test_edge_cases(costs, num_replicas, plan):
    assert assign_requests(costs, num_replicas) == plan
