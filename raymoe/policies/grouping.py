"""Speculative expert grouping: experts that fire for the same requests share a node.

Co-clustering of calibration requests and experts, per layer, under a balance constraint.
Requests are assigned to nodes and, at each layer, experts to nodes; the two alternate:
  - given which requests each node runs, every layer gives each node the experts its
    requests use most, while no node's expert load passes its speed share by more than
    `balance_slack` (grouping co-firing experts makes loads swing together; the cap
    keeps the expected load level);
  - given the experts per node, each request moves to the node holding the largest share
    of its token-expert pairs, every node taking its speed share of requests.
A request keeps one node across all layers (its attention and KV live there), so the
clustering is joint over layers, not one layer at a time. Slots left after each expert
has one copy get replicas of the experts the node's own requests use most but it lacks.
"""

from __future__ import annotations

import numpy as np

from raymoe.policies.plan import Plan, plan_from_node_lists
from raymoe.policies.topology import Topology


def base_slot_counts(num_experts: int, topology: Topology) -> np.ndarray:
    """`[nodes]` how many distinct experts each node holds, summing to `num_experts`.

    Faster nodes hold more, within their slots.
    """
    speeds, slots = topology.speed_array, topology.slots_per_node
    counts = np.minimum(np.floor(num_experts * speeds / speeds.sum()), slots).astype(np.int64)
    while counts.sum() < num_experts:
        room = np.where(counts < slots, speeds / (counts + 1), -np.inf)
        counts[np.argmax(room)] += 1
    return counts


def assign_experts(affinity: np.ndarray, load: np.ndarray, counts: np.ndarray,
                   speeds: np.ndarray, balance_slack: float,
                   preload: np.ndarray | None = None) -> list[list[int]]:
    """One copy of each expert, `[nodes][experts]`, for one layer.

    affinity: `[experts, nodes]` pairs of each node's requests on each expert.
    load: `[experts]` pairs the single copy will serve; counts: `[nodes]` experts per node.
    preload: `[nodes]` pairs a node serves already (through its replicas).
    """
    num_experts, num_nodes = affinity.shape
    node_load = np.zeros(num_nodes) if preload is None else preload.astype(np.float64).copy()
    cap = (load.sum() + node_load.sum()) * speeds / speeds.sum() * (1 + balance_slack)
    nodes: list[list[int]] = [[] for _ in range(num_nodes)]
    # Heaviest first, so that late heavy experts never find every node full (as LPT).
    for expert in np.argsort(-load, kind="stable"):
        has_room = np.array([len(n) for n in nodes]) < counts
        fits = has_room & (node_load + load[expert] <= cap)
        if fits.any():
            node = int(np.argmax(np.where(fits, affinity[expert], -np.inf)))
        else:
            node = int(np.argmin(np.where(has_room, (node_load + load[expert]) / speeds, np.inf)))
        nodes[node].append(int(expert))
        node_load[node] += load[expert]
    return nodes


def layer_experts(affinity: np.ndarray, counts: np.ndarray, speeds: np.ndarray, slots: int,
                  balance_slack: float) -> list[list[int]]:
    """Experts per node `[nodes][slots]` for one layer, replicas included.

    Twice: the first pass finds which nodes get replicas; the second balances the single
    copies against the load those replicas take off them (with local-first dispatch, a
    node with a replica serves its own requests' pairs on that expert).
    """
    nodes = add_replicas(assign_experts(affinity, affinity.sum(1), counts, speeds,
                                        balance_slack), affinity, slots)
    extra = np.zeros_like(affinity, dtype=bool)
    for node, members in enumerate(nodes):
        extra[members[counts[node]:], node] = True
    single_load = np.where(extra, 0.0, affinity).sum(1)
    preload = np.where(extra, affinity, 0.0).sum(0)
    base = assign_experts(affinity, single_load, counts, speeds, balance_slack, preload)
    return add_replicas(base, affinity, slots)


def add_replicas(nodes: list[list[int]], affinity: np.ndarray, slots: int) -> list[list[int]]:
    """Fill each node's free slots with the experts its own requests use most but it lacks."""
    out = []
    for node, members in enumerate(nodes):
        by_use = [int(e) for e in np.argsort(-affinity[:, node], kind="stable")]
        wanted = [e for e in by_use if e not in members]
        # More slots than experts: second copies on one node are idle but keep plans square.
        wanted += by_use * (slots // max(1, len(by_use)) + 1)
        out.append(members + wanted[: slots - len(members)])
    return out


def balanced_assign(scores: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """`[requests]` node per request, each node taking at most `caps[node]` requests.

    scores: `[requests, nodes]`. Requests with the clearest preference choose first.
    """
    ranked = np.sort(scores, axis=1)
    margin = ranked[:, -1] - (ranked[:, -2] if scores.shape[1] > 1 else 0.0)
    out, count = np.empty(len(scores), dtype=np.int64), np.zeros(len(caps), dtype=np.int64)
    for request in np.argsort(-margin, kind="stable"):
        node = int(np.argmax(np.where(count < caps, scores[request], -np.inf)))
        out[request] = node
        count[node] += 1
    return out


def held_mask(node_experts: list[list[list[int]]], num_experts: int) -> np.ndarray:
    """`[layers, experts, nodes]` 1.0 where a node holds a copy of the expert."""
    held = np.zeros((len(node_experts), num_experts, len(node_experts[0])))
    for layer, nodes in enumerate(node_experts):
        for node, members in enumerate(nodes):
            held[layer, members, node] = 1.0
    return held


def cocluster(profiles: np.ndarray, load: np.ndarray, topology: Topology, *,
              balance_slack: float = 0.1, num_iters: int = 8, num_restarts: int = 3,
              seed: int = 0, init: np.ndarray | None = None
              ) -> tuple[list[list[list[int]]], np.ndarray]:
    """Experts per node per layer `[layers][nodes][slots]`, and calibration request nodes.

    profiles: `[requests, layers, experts]` each calibration request's expert shares.
    load: `[layers, experts]`. The best of `num_restarts` random starts, by how many of the
    calibration requests' pairs land on their own node. init: `[requests]` nodes to start
    from instead (where the requests run now), so node identities stay put on a re-plan.
    """
    rng = np.random.default_rng(seed)
    best, best_score = None, -np.inf
    for _ in range(1 if init is not None else num_restarts):
        request_node = (init if init is not None
                        else rng.permutation(len(profiles)) % topology.num_nodes)
        for _ in range(num_iters):
            node_experts = _experts_for(profiles, request_node, load, topology, balance_slack)
            scores = np.einsum("rle,len->rn", profiles, held_mask(node_experts, load.shape[1]))
            request_node = balanced_assign(scores, _request_caps(len(profiles), topology))
        score = scores[np.arange(len(profiles)), request_node].sum()
        if score > best_score:
            best, best_score = (node_experts, request_node), score
    return best


def _request_caps(num_requests: int, topology: Topology) -> np.ndarray:
    share = topology.speed_array / topology.speed_array.sum()
    return np.ceil(num_requests * share).astype(np.int64)


def _experts_for(profiles, request_node, load, topology, balance_slack):
    counts = base_slot_counts(load.shape[1], topology)
    one_hot = np.eye(topology.num_nodes)[request_node]  # [requests, nodes]
    affinity = np.einsum("rle,rn->len", profiles, one_hot)  # [layers, experts, nodes]
    return [
        layer_experts(affinity[layer], counts, topology.speed_array, topology.slots_per_node,
                      balance_slack)
        for layer in range(load.shape[0])
    ]


def grouping_plan(profiles: np.ndarray, load: np.ndarray, topology: Topology,
                  balance_slack: float = 0.1, seed: int = 0,
                  init: np.ndarray | None = None) -> Plan:
    """Plan from co-clustering. profiles: `[requests, layers, experts]`; load: `[layers, experts]`;
    init: `[requests]` current node of each profiled request, if they are running."""
    topology.check_fits(load.shape[1])
    node_experts, _ = cocluster(profiles, load, topology, balance_slack=balance_slack, seed=seed,
                                init=init)
    return plan_from_node_lists(node_experts, topology, load.shape[1])
