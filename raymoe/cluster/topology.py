"""Topology: the live Ray nodes and their capacities, read from Ray's node table.

A node's relative speed is its `raymoe_speed` custom resource (default 1): set it when starting the
node (`ray start --resources '{"raymoe_speed": 2}'`, or `rayStartParams` in KubeRay). Nodes differ;
the placement gives faster nodes more experts and replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

SPEED_RESOURCE = "raymoe_speed"


@dataclass(frozen=True)
class NodeInfo:
    node_id: str  # Ray node id (hex)
    address: str  # node manager IP
    num_cpus: float
    speed: float  # relative compute speed; 1 = baseline
    memory_bytes: float  # Ray's schedulable memory on the node


class Topology:
    """The alive nodes, in Ray's order."""

    def __init__(self, nodes: list[NodeInfo]):
        self.nodes = list(nodes)
        self._by_id = {n.node_id: n for n in self.nodes}

    @classmethod
    def from_ray_nodes(cls, ray_nodes: list[dict]) -> Topology:
        """From `ray.nodes()` dicts; dead nodes are left out."""
        nodes = []
        for n in ray_nodes:
            if not n.get("Alive", n.get("alive", False)):
                continue
            res = n.get("Resources", {})
            nodes.append(
                NodeInfo(
                    node_id=n["NodeID"],
                    address=n.get("NodeManagerAddress", ""),
                    num_cpus=float(res.get("CPU", 0.0)),
                    speed=float(res.get(SPEED_RESOURCE, 1.0)),
                    memory_bytes=float(res.get("memory", 0.0)),
                )
            )
        return cls(nodes)

    @classmethod
    def from_ray(cls) -> Topology:
        """Read the connected Ray cluster's node table (imports ray only here)."""
        import ray

        return cls.from_ray_nodes(ray.nodes())

    @property
    def node_ids(self) -> list[str]:
        return [n.node_id for n in self.nodes]

    def is_alive(self, node_id: str) -> bool:
        return node_id in self._by_id

    def node(self, node_id: str) -> NodeInfo:
        return self._by_id[node_id]

    def speed(self, node_id: str) -> float:
        return self._by_id[node_id].speed

    def fastest_first(self) -> list[NodeInfo]:
        return sorted(self.nodes, key=lambda n: (-n.speed, self.nodes.index(n)))

    def __len__(self) -> int:
        return len(self.nodes)
