"""Re-planning from recent load with few weight moves.

A full re-plan can move most expert copies between nodes; at serving time every move is
weights on the wire. The incremental re-plan keeps one copy of every expert where it is
(its anchor, on the holder whose own requests use it most) and re-fills only the other
slots, from the demand each node's running requests showed in the recent window.
Weights moved per re-plan are thus the redundant slots, plus at most `max_swaps` pairs of
single-copy experts swapped between nodes per layer when the recent load left a node
behind (with no redundant slots, those swaps are the only way to rebalance).
"""

from __future__ import annotations

import numpy as np

from raymoe.policies.plan import Plan, plan_from_node_lists
from raymoe.policies.replication import best_swap
from raymoe.policies.topology import Topology


def anchors(held: np.ndarray, demand: np.ndarray) -> np.ndarray:
    """`[experts]` the node whose copy of each expert stays put.

    held: `[experts, nodes]` copies per node; demand: `[experts, nodes]` recent pairs of
    each node's requests on each expert. Experts with the fewest copies choose first, so
    a node's sole experts are never pushed out by replicas.
    """
    num_experts, num_nodes = held.shape
    room = np.full(num_nodes, -(-num_experts // num_nodes), dtype=np.int64)
    out = np.empty(num_experts, dtype=np.int64)
    for expert in np.argsort((held > 0).sum(1), kind="stable"):
        holders = held[expert] > 0
        options = holders & (room > 0)
        pool = options if options.any() else holders
        node = int(np.argmax(np.where(pool, demand[expert], -np.inf)))
        out[expert] = node
        room[node] -= 1
    return out


def refill(anchor: np.ndarray, demand: np.ndarray, slots: int) -> list[list[int]]:
    """Experts per node `[nodes][slots]`: anchors, then the node's most demanded others."""
    num_experts, num_nodes = demand.shape
    nodes = [np.flatnonzero(anchor == n).tolist() for n in range(num_nodes)]
    for node, members in enumerate(nodes):
        by_use = [int(e) for e in np.argsort(-demand[:, node], kind="stable")]
        wanted = [e for e in by_use if e not in members]
        wanted += by_use * (slots // max(1, len(by_use)) + 1)  # more slots than experts
        members += wanted[: slots - len(members)]
    return nodes


def modelled_loads(nodes: list[list[int]], demand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Node loads under local-first dispatch, and each expert's single-copy load.

    nodes: `[nodes][slots]`; demand: `[experts, nodes]`. Returns (`[nodes]` load carried
    by replicated experts and local hits, `[experts]` load of experts held once).
    """
    num_experts, num_nodes = demand.shape
    held = np.zeros((num_experts, num_nodes), dtype=bool)
    for node, members in enumerate(nodes):
        held[members, node] = True
    copies = held.sum(1)
    remote = np.where(held, 0.0, demand).sum(1)  # [E] pairs from nodes without a copy
    shared = (np.where(held, demand, 0.0) + (remote / np.maximum(copies, 1))[:, None] * held)
    offset = shared[copies > 1].sum(0)
    single = np.where(copies == 1, demand.sum(1), 0.0)
    return offset, single


def rebalance(nodes: list[list[int]], demand: np.ndarray, speeds: np.ndarray,
              max_swaps: int) -> list[list[int]]:
    """Swap single-copy experts out of the node that would finish last, at most `max_swaps`."""
    offset, single = modelled_loads(nodes, demand)
    is_single = single > 0
    owner = np.array([n for n, m in enumerate(nodes) for e in m if is_single[e]], dtype=np.int64)
    items = np.array([e for m in nodes for e in m if is_single[e]], dtype=np.int64)
    for _ in range(max_swaps):
        swap = best_swap(owner, items, single, speeds, offset) if len(items) else None
        if swap is None:
            break
        a, b = swap
        items[a], items[b] = items[b], items[a]
    moved = {int(e): int(n) for n, e in zip(owner, items)}
    return [[e for e in m if not is_single[e]] + [e for e, n in moved.items() if n == node]
            for node, m in enumerate(nodes)]


def incremental_plan(current: Plan, demand: np.ndarray, topology: Topology,
                     max_swaps: int = 4) -> Plan:
    """Re-fill redundant slots from recent demand, then swap at most `max_swaps` pairs of
    single-copy experts per layer to rebalance. demand: `[layers, experts, nodes]`."""
    held = current.replicas_on_node(topology.num_nodes)  # [L, E, N]
    node_experts = []
    for layer in range(current.num_layers):
        nodes = refill(anchors(held[layer], demand[layer]), demand[layer], topology.slots_per_node)
        node_experts.append(rebalance(nodes, demand[layer], topology.speed_array, max_swaps))
    return plan_from_node_lists(node_experts, topology, current.num_experts)


def load_drift(planned: np.ndarray, recent: np.ndarray) -> float:
    """Mean over layers of the total variation distance between two load profiles.

    planned, recent: `[layers, experts]`. 0 when the shares match, 1 when disjoint.
    """
    p = planned / np.maximum(planned.sum(1, keepdims=True), 1e-12)
    q = recent / np.maximum(recent.sum(1, keepdims=True), 1e-12)
    return float(0.5 * np.abs(p - q).sum(1).mean())


def align(current: Plan, new: Plan, topology: Topology) -> Plan:
    """`new` with its nodes' expert sets relabelled to keep as many copies in place as can be.

    Which equal-speed node gets which set of experts is arbitrary in a fresh plan; matching
    each set to the old node that already holds most of it saves those weight moves.
    Only nodes of the same speed swap sets, so the plan's balance is unchanged.
    """
    old_held = current.replicas_on_node(topology.num_nodes)  # [L, E, N]
    new_held = new.replicas_on_node(topology.num_nodes)
    speeds = np.asarray(topology.speeds)
    phy2node = new.phy2node.copy()
    for layer in range(new.num_layers):
        overlap = new_held[layer].T @ (old_held[layer] > 0)  # [new node, old node] kept copies
        overlap = overlap.astype(np.float64)
        overlap[speeds[:, None] != speeds[None, :]] = -np.inf
        relabel = _greedy_match(overlap)
        phy2node[layer] = relabel[new.phy2node[layer]]
    return Plan(new.phy2log.copy(), phy2node, new.logcnt.copy())


def _greedy_match(score: np.ndarray) -> np.ndarray:
    """`[rows]` a column per row, one-to-one, taking the highest remaining score first."""
    out = np.full(score.shape[0], -1, dtype=np.int64)
    score = score.copy()
    for _ in range(score.shape[0]):
        row, col = np.unravel_index(np.argmax(score), score.shape)
        out[row] = col
        score[row, :] = -np.inf
        score[:, col] = -np.inf
    return out
