"""The cluster as the policies see it: nodes, expert slots per node, relative node speed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raymoe.errors import RaymoeError


class TopologyError(RaymoeError, ValueError):
    """A topology that no plan can be made for; the message says which value to fix."""


@dataclass(frozen=True)
class Topology:
    """Nodes that hold expert slots.

    num_nodes: how many nodes (Ray nodes, or devices when each device is its own node).
    slots_per_node: physical experts one node holds per MoE layer.
    speeds: relative speed per node, `[num_nodes]`; a node of speed 2 finishes the same
        expert work in half the time. Defaults to all 1 (equal nodes).
    """

    num_nodes: int
    slots_per_node: int
    speeds: tuple[float, ...] | None = None

    def __post_init__(self):
        if int(self.num_nodes) != self.num_nodes or self.num_nodes < 1:
            raise TopologyError(f"num_nodes={self.num_nodes!r}: give a whole number >= 1")
        if int(self.slots_per_node) != self.slots_per_node or self.slots_per_node < 1:
            raise TopologyError(
                f"slots_per_node={self.slots_per_node!r}: give a whole number >= 1"
            )
        speeds = (1.0,) * self.num_nodes if self.speeds is None else tuple(self.speeds)
        if len(speeds) != self.num_nodes:
            raise TopologyError(
                f"{len(speeds)} speeds given for {self.num_nodes} nodes: give one speed per node"
            )
        for node, speed in enumerate(speeds):
            if not np.isfinite(speed) or speed <= 0:
                raise TopologyError(
                    f"node {node} has speed {speed!r}: every speed must be a finite number > 0; "
                    "remove a node that cannot run experts from the topology instead"
                )
        object.__setattr__(self, "speeds", tuple(float(s) for s in speeds))

    @property
    def num_slots(self) -> int:
        """Physical experts per layer over the whole cluster."""
        return self.num_nodes * self.slots_per_node

    @property
    def speed_array(self) -> np.ndarray:
        """`[num_nodes]` float64."""
        return np.asarray(self.speeds, dtype=np.float64)

    @property
    def is_uniform(self) -> bool:
        return len(set(self.speeds)) == 1

    def check_fits(self, num_experts: int) -> None:
        """Every logical expert needs at least one slot, or some tokens could not be served."""
        if self.num_slots < num_experts:
            raise TopologyError(
                f"{self.num_nodes} nodes x {self.slots_per_node} slots = {self.num_slots} slots "
                f"cannot hold {num_experts} experts: raise slots_per_node to at least "
                f"{-(-num_experts // self.num_nodes)} or add nodes"
            )
