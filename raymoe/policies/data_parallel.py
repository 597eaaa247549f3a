"""Which data-parallel engine replica runs each request of a `raymoe.LLM.generate` batch.

A request's cost is its prompt tokens plus the tokens it asks for (`max_tokens`): what its prefill
and decode steps carry. Greedy longest-first (LPT): each request, most costly first, goes to the
replica with the least cost so far, so the replicas finish at about the same time. Pure: no Ray.
"""

from __future__ import annotations


def assign_requests(costs: list[int], num_replicas: int) -> list[list[int]]:
    """costs [requests] -> the request indices of each replica [replicas][...], each list in
    ascending order (a replica runs its requests in the order they were given). Ties go to the
    lower replica, so the plan is deterministic."""
    assert num_replicas >= 1, num_replicas
    loads = [0] * num_replicas
    plan: list[list[int]] = [[] for _ in range(num_replicas)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        replica = min(range(num_replicas), key=lambda r: (loads[r], r))
        loads[replica] += costs[i]
        plan[replica].append(i)
    return [sorted(indices) for indices in plan]


def replica_loads(costs: list[int], plan: list[list[int]]) -> list[int]:
    """The summed cost of each replica under a plan [replicas]."""
    return [sum(costs[i] for i in indices) for indices in plan]
