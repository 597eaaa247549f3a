"""From a policy's plan (pure numpy, `raymoe.policies`) to the controller's Placement (Ray shards).

A plan names nodes by index (`phy2node [layers, num_physical]`); the controller's shards live on
Ray nodes. Node index i is the i-th distinct node of the current shards, in shard order; a node's
physical experts are dealt over the shards on it, round robin.
"""

from __future__ import annotations

import math

import numpy as np

from raymoe.cluster.placement import Placement
from raymoe.policies.registry import REGISTRY, PolicyName
from raymoe.policies.stats import Calibration
from raymoe.policies.topology import Topology


def policy_topology(current: Placement, node_speeds: dict[str, float], num_experts: int,
                    extra_replicas: int) -> tuple[Topology, list[str]]:  # fmt: skip
    """The policies' view of the shards' nodes: slots per node so every expert fits once plus
    `extra_replicas` per layer. Returns (topology, node ids in index order)."""
    nodes = list(dict.fromkeys(current.shard_nodes))
    slots = math.ceil((num_experts + extra_replicas) / len(nodes))
    return Topology(len(nodes), slots, tuple(node_speeds.get(n, 1.0) for n in nodes)), nodes


def plan_placement(policy: PolicyName, load: np.ndarray, moe_layers: list[int], current: Placement,
                   node_speeds: dict[str, float], extra_replicas: int, profiles: np.ndarray | None = None,
                   request_nodes: list[str] | None = None) -> Placement:  # fmt: skip
    """load: `[layers, experts]` (model layer ids as rows) -> the next Placement (epoch unchanged;
    the controller bumps it when it applies). profiles: `[requests, moe layers, experts]` the live
    requests' routing (per-token expert shares), request_nodes: the node each runs on; the grouping
    policies cluster them (regrouping starts from where they run)."""
    layer_load = np.asarray(load, dtype=np.float64)[moe_layers]  # [moe layers, experts]
    topology, nodes = policy_topology(current, node_speeds, layer_load.shape[1], extra_replicas)
    calibration = request_calibration(layer_load, profiles, request_nodes, nodes)
    plan = REGISTRY[policy].build(calibration, topology)
    return placement_from_plan(plan, moe_layers, current, nodes)


def request_calibration(load: np.ndarray, profiles: np.ndarray | None, request_nodes: list[str] | None,
                        nodes: list[str]) -> Calibration:
    """The policies' input from live statistics: load `[moe layers, experts]`, the requests'
    profiles, and each request's node index (None unless every request runs on a planned node)."""
    if profiles is None or len(profiles) == 0:
        return Calibration(load, np.zeros((0,) + load.shape))
    calibration = Calibration(load, np.asarray(profiles, dtype=np.float64))
    index = {n: i for i, n in enumerate(nodes)}
    if request_nodes is not None and all(n in index for n in request_nodes):
        calibration.request_node = np.array([index[n] for n in request_nodes], dtype=np.int64)
    return calibration


def placement_from_plan(plan, moe_layers: list[int], current: Placement, nodes: list[str]) -> Placement:
    """A policy's plan (node i = `nodes[i]`) over `current`'s shards: each node's physical experts
    dealt round robin over its shards (epoch unchanged; the controller bumps it when it applies)."""
    shards_of = {n: [s for s, sn in enumerate(current.shard_nodes) if sn == n] for n in nodes}
    expert_to_shards: dict = {}
    for i, layer in enumerate(moe_layers):
        turn = {n: 0 for n in nodes}
        for log, node_index in zip(plan.phy2log[i], plan.phy2node[i]):
            node = nodes[int(node_index)]
            shard = shards_of[node][turn[node] % len(shards_of[node])]
            turn[node] += 1
            held = expert_to_shards.setdefault((layer, int(log)), ())
            if shard not in held:  # two replicas on one shard would add nothing
                expert_to_shards[(layer, int(log))] = held + (shard,)
    return Placement(current.epoch, current.shard_names, current.shard_nodes, expert_to_shards)
