"""Cluster membership: which nodes serve experts, and what changed since the controller last looked.

Pure (no Ray): the controller passes `ray.nodes()` dicts. A node serves while it is alive and not
draining. A node drains when it carries the `raymoe_drain` custom resource (start it with
`--resources '{"raymoe_drain": 1}'` to keep experts off it, e.g. before a planned scale-down) or
when the operator asks the controller (`drain_node(node_id)`); the controller also passes the
nodes Ray itself is draining (`ray drain-node`, autoscaler scale-down). A node that leaves the serving set
left because it died (`dead`: Ray's node table says not alive, or no longer lists it) or was
drained (`drained`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from raymoe.cluster.topology import NodeInfo, Topology

DRAIN_RESOURCE = "raymoe_drain"


@dataclass(frozen=True)
class NodeChange:
    joined: tuple[NodeInfo, ...] = ()
    left: tuple[tuple[str, str], ...] = ()  # (node id, "dead" | "drained")

    def __bool__(self) -> bool:
        return bool(self.joined or self.left)


def _is_alive(entry: dict) -> bool:
    return bool(entry.get("Alive", entry.get("alive", False)))


def is_draining(entry: dict, drained: Collection[str] = ()) -> bool:
    return entry["NodeID"] in drained or entry.get("Resources", {}).get(DRAIN_RESOURCE, 0) > 0


def serving_topology(ray_nodes: list[dict], drained: Collection[str] = ()) -> Topology:
    """The nodes that may hold experts: alive and not draining, in Ray's order."""
    return Topology.from_ray_nodes([n for n in ray_nodes if _is_alive(n) and not is_draining(n, drained)])


def diff_nodes(before: Topology, ray_nodes: list[dict], drained: Collection[str] = ()) -> tuple[NodeChange, Topology]:
    """(what changed from `before`, the serving topology now)."""
    after = serving_topology(ray_nodes, drained)
    by_id = {n["NodeID"]: n for n in ray_nodes}
    joined = tuple(n for n in after.nodes if not before.is_alive(n.node_id))
    left = tuple(
        (node_id, "drained" if node_id in by_id and _is_alive(by_id[node_id]) else "dead")
        for node_id in before.node_ids
        if not after.is_alive(node_id)
    )
    return NodeChange(joined, left), after
