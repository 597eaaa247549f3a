"""A placement plan: which logical expert each physical expert is, and which node holds it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raymoe.policies.topology import Topology


@dataclass
class Plan:
    """Per MoE layer, the physical experts and the node of each.

    A plan may leave slots empty (no replication: fewer physical experts than slots).

    phy2log: `[layers, num_physical]` logical expert id of each physical expert.
    phy2node: `[layers, num_physical]` node that holds each physical expert.
    logcnt: `[layers, experts]` replica count of each logical expert (>= 1: every expert
        must be somewhere, or a token routed to it could not be served).
    """

    phy2log: np.ndarray
    phy2node: np.ndarray
    logcnt: np.ndarray

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_physical(self) -> int:
        return self.phy2log.shape[1]

    @property
    def num_experts(self) -> int:
        return self.logcnt.shape[1]

    def log2phy(self) -> np.ndarray:
        """`[layers, experts, max replicas]` physical ids of each expert's replicas, -1 padded."""
        width = int(self.logcnt.max())
        out = np.full((self.num_layers, self.num_experts, width), -1, dtype=np.int64)
        for layer in range(self.num_layers):
            fill = np.zeros(self.num_experts, dtype=np.int64)
            for phy, log in enumerate(self.phy2log[layer]):
                out[layer, log, fill[log]] = phy
                fill[log] += 1
        return out

    def replicas_on_node(self, num_nodes: int) -> np.ndarray:
        """`[layers, experts, nodes]` how many replicas of each expert each node holds."""
        out = np.zeros((self.num_layers, self.num_experts, num_nodes), dtype=np.int64)
        layer = np.repeat(np.arange(self.num_layers), self.num_physical)
        np.add.at(out, (layer, self.phy2log.ravel(), self.phy2node.ravel()), 1)
        return out

    def to_json(self) -> dict:
        return {
            "phy2log": self.phy2log.tolist(),
            "phy2node": self.phy2node.tolist(),
            "logcnt": self.logcnt.tolist(),
        }

    def check(self, topology: Topology) -> None:
        """Internal invariants every policy's output keeps."""
        assert self.phy2log.shape == self.phy2node.shape
        assert self.num_physical <= topology.num_slots
        counts = np.stack([np.bincount(r, minlength=self.num_experts) for r in self.phy2log])
        assert (counts == self.logcnt).all(), "logcnt disagrees with phy2log"
        assert (self.logcnt >= 1).all(), "an expert has no replica"
        per_node = np.stack([np.bincount(r, minlength=topology.num_nodes) for r in self.phy2node])
        assert (per_node <= topology.slots_per_node).all(), "a node holds more than its slots"


def slot_nodes(topology: Topology, num_layers: int) -> np.ndarray:
    """`[layers, num_physical]` node of each slot, in slot order."""
    nodes = np.repeat(np.arange(topology.num_nodes), topology.slots_per_node)
    return np.tile(nodes, (num_layers, 1))


def plan_from_node_lists(node_experts: list[list[list[int]]], topology: Topology,
                         num_experts: int) -> Plan:
    """Build a plan from `node_experts[layer][node]` = the logical experts that node holds."""
    phy2log = np.array(
        [[e for node in layer for e in node] for layer in node_experts], dtype=np.int64
    )
    logcnt = np.stack([np.bincount(r, minlength=num_experts) for r in phy2log])
    plan = Plan(phy2log, slot_nodes(topology, len(node_experts)), logcnt)
    plan.check(topology)
    return plan
