"""raymoe's load-balanced expert replication for nodes of unequal speed.

From per-expert load `[layers, experts]` and a topology (slots and relative speed per node):
  1. replica counts: each redundant slot goes to the expert with the highest load per
     replica (as EPLB), but never more replicas than nodes: two copies on one node
     cannot balance anything between nodes;
  2. packing: physical experts, heaviest first, each onto the node that would finish
     earliest with it (load / speed), among nodes with a free slot and no copy of it yet;
  3. refinement: swap pairs of physical experts between the node that finishes last and
     another while that lowers the later of the two finish times.
At serving time the dispatcher picks among replicas per batch (`dispatch.balanced`), so
replicas also absorb the batch-to-batch swing that no static plan can foresee.
"""

from __future__ import annotations

import numpy as np

from raymoe.policies.plan import Plan, plan_from_node_lists
from raymoe.policies.topology import Topology


def replica_counts(load: np.ndarray, num_physical: int, max_replicas: int) -> np.ndarray:
    """`[experts]` replica count per expert, summing to `num_physical`. load: `[experts]`."""
    num_experts = len(load)
    logcnt = np.ones(num_experts, dtype=np.int64)
    for _ in range(num_physical - num_experts):
        per_replica = np.where(logcnt < max_replicas, load / logcnt, -np.inf)
        if np.isneginf(per_replica).all():
            per_replica = load / logcnt  # every expert on every node: extra copies idle
        logcnt[np.argmax(per_replica)] += 1
    return logcnt


def pack(load: np.ndarray, logcnt: np.ndarray, topology: Topology) -> list[list[int]]:
    """Experts per node for one layer, `[nodes][slots]`. load, logcnt: `[experts]`."""
    speeds = topology.speed_array
    items = np.repeat(np.arange(len(load)), logcnt)  # [physical] logical id
    weight = (load / logcnt)[items]
    node_load = np.zeros(topology.num_nodes)
    nodes: list[list[int]] = [[] for _ in range(topology.num_nodes)]
    for item in np.argsort(-weight, kind="stable"):
        expert = int(items[item])
        has_room = np.array([len(n) < topology.slots_per_node for n in nodes])
        fresh = has_room & np.array([expert not in n for n in nodes])
        allowed = fresh if fresh.any() else has_room
        finish = np.where(allowed, (node_load + weight[item]) / speeds, np.inf)
        best = int(np.argmin(finish))
        nodes[best].append(expert)
        node_load[best] += weight[item]
    return refine(nodes, load / logcnt, speeds)


def refine(nodes: list[list[int]], per_replica: np.ndarray, speeds: np.ndarray,
           max_swaps: int = 64) -> list[list[int]]:
    """Swap physical experts out of the last-finishing node while that helps.

    nodes: `[nodes][slots]` logical ids; per_replica: `[experts]` load of one replica.
    """
    owner = np.repeat(np.arange(len(nodes)), [len(n) for n in nodes])  # [physical]
    items = np.array([e for n in nodes for e in n], dtype=np.int64)  # [physical]
    for _ in range(max_swaps):
        swap = best_swap(owner, items, per_replica, speeds)
        if swap is None:
            break
        a, b = swap
        items[a], items[b] = items[b], items[a]
    return [items[owner == n].tolist() for n in range(len(nodes))]


def best_swap(owner, items, per_replica, speeds, offset=None):
    """(physical on the last node, physical elsewhere) whose swap lowers the later finish most.

    offset: `[nodes]` load the nodes carry besides these items.
    """
    num_nodes = len(speeds)
    node_load = np.bincount(owner, per_replica[items], minlength=num_nodes)
    if offset is not None:
        node_load = node_load + offset
    held = np.zeros((num_nodes, len(per_replica)), dtype=bool)  # [nodes, experts]
    held[owner, items] = True
    worst = int(np.argmax(node_load / speeds))
    mine, theirs = np.flatnonzero(owner == worst), np.flatnonzero(owner != worst)
    delta = per_replica[items[mine]][:, None] - per_replica[items[theirs]][None, :]
    # A node must not end up with two copies of one expert.
    clash = held[worst, items[theirs]][None, :] | held[owner[theirs]][:, items[mine]].T
    finish = np.maximum((node_load[worst] - delta) / speeds[worst],
                        (node_load[owner[theirs]] + delta) / speeds[owner[theirs]])
    finish = np.where((delta > 0) & ~clash, finish, np.inf)
    if finish.size == 0 or finish.min() >= node_load[worst] / speeds[worst] - 1e-9:
        return None
    i, j = np.unravel_index(np.argmin(finish), finish.shape)
    return mine[i], theirs[j]


def replication_plan(load: np.ndarray, topology: Topology, smoothing: float = 0.05) -> Plan:
    """raymoe's replication plan. load: `[layers, experts]` token-expert pairs.

    smoothing: share of a uniform load mixed in, so that an expert idle in the calibration
    window (zero load) is still placed as if it might wake up, and a plan does not bet
    everything on one window's exact counts.
    """
    num_layers, num_experts = load.shape
    topology.check_fits(num_experts)
    node_experts = []
    for layer_load in np.asarray(load, dtype=np.float64):
        total = layer_load.sum()
        uniform = total / num_experts if total > 0 else 1.0
        hedged = (1 - smoothing) * layer_load + smoothing * uniform
        logcnt = replica_counts(hedged, topology.num_slots, topology.num_nodes)
        node_experts.append(pack(hedged, logcnt, topology))
    return plan_from_node_lists(node_experts, topology, num_experts)
