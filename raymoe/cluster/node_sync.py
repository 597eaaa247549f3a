"""The controller following nodes as they join and leave (part of `Controller`, kept apart to stay short).

`sync_nodes` compares Ray's node table with the nodes the placement accounts for (`membership`):
- a node gone (dead, or drained: Ray's own drain, the `raymoe_drain` resource or `drain_node`)
  has its shards removed: each expert keeps its replicas on the other shards, and one with no
  replica left is reloaded from the checkpoint on the surviving shard with the fewest experts per
  unit of speed (`placement.reshard`); a drained node's shards stop only after every worker acked;
- a new node gets `shards_per_node` shards and the placement is re-planned over all shards from
  the recent load and node speeds (under the configured policy when set); the new shards load
  their experts before the new epoch is published (`Controller.reshape`).
Each change is an event: `node_left` / `node_joined` with the epoch that carried it out; a join's
`time` is when that epoch was published (experts on the node from then on) and `detected_at` when
the controller saw the node, so `time - detected_at` is the node's time to serve.
"""

from __future__ import annotations

import functools
import time

import ray

from raymoe.cluster.membership import diff_nodes
from raymoe.cluster.placement import Placement, reshard
from raymoe.cluster.topology import Topology
from raymoe.errors import ConfigError


def ray_draining_nodes() -> set[str]:
    """Nodes Ray itself is draining (`ray drain-node`, the autoscaler's or KubeRay's scale-down):
    their experts move off before Ray stops them. Empty where this Ray cannot say."""
    try:
        return set(_gcs_client(ray.get_runtime_context().gcs_address).get_draining_nodes(timeout=10))
    except Exception:  # noqa: BLE001 (a private API: without it, drain through drain_node)
        return set()


@functools.lru_cache(maxsize=4)
def _gcs_client(address: str):
    from ray._raylet import GcsClient

    return GcsClient(address=address)


class NodeSync:
    """Mixed into `Controller`; uses its placement, shards, `plan` and `reshape`."""

    def sync_nodes(self, ray_nodes: list[dict] | None = None) -> list[dict]:
        """Follow Ray's node table (`ray.nodes()` dicts; read now when None); returns the events."""
        with self._membership:
            detected = time.time()
            drained = self._drained if ray_nodes is not None else self._drained | ray_draining_nodes()
            change, serving = diff_nodes(self._members, ray.nodes() if ray_nodes is None else ray_nodes, drained)
            if not change:
                return []
            self.topology = serving
            with self._applying:  # planned over the shards it is applied to
                return self._apply_change(change, serving, detected)

    def _apply_change(self, change, serving: Topology, detected: float) -> list[dict]:
        events = []
        if change.left:
            events += self._nodes_left(change.left, serving, detected)
            gone = {node for node, _ in change.left}
            self._members = Topology([n for n in self._members.nodes if n.node_id not in gone])
        if change.joined:
            events += self._nodes_joined(change.joined, detected)
        self._members = serving
        return events

    def drain_node(self, node_id: str) -> list[dict]:
        """Move every expert off `node_id` (it keeps running; nothing is placed there again)."""
        if node_id not in {n["NodeID"] for n in ray.nodes()}:
            raise ConfigError(f"no Ray node {node_id!r}; `ray.nodes()` lists the node ids")
        self._drained.add(node_id)
        return self.sync_nodes()

    def sync_failed(self, error: BaseException) -> None:
        self._event("sync_failed", None, repr(error), self._placement.epoch)

    def _nodes_left(self, left, serving: Topology, detected: float) -> list[dict]:
        ids = {node for node, _ in left}
        with self._state:
            current = self._placement
        gone = [s for s, node in enumerate(current.shard_nodes) if node in ids]
        hit = [[s in gone for s in shards] for shards in current.expert_to_shards.values()]
        orphans, on_replicas = sum(map(all, hit)), sum(any(h) and not all(h) for h in hit)
        epoch = current.epoch
        if gone:
            keep = [s for s in range(current.num_shards) if s not in gone]
            fresh = [] if keep else self._fresh_shard_nodes(serving.nodes)  # no shard survives
            new = self._resharded(current, keep, fresh)
            epoch = self.reshape(new, keep, retire=gone)
        return [
            self._event(
                "node_left", node, reason, epoch, detected_at=detected,
                shards_removed=sum(current.shard_nodes[s] == node for s in gone),
                experts_reloaded=orphans, experts_on_replicas=on_replicas,
            )
            for node, reason in left
        ]  # fmt: skip

    def _nodes_joined(self, joined, detected: float) -> list[dict]:
        with self._state:
            current = self._placement
        new, epoch = current, current.epoch
        without = [n for n in joined if n.node_id not in current.shard_nodes]  # not given shards already
        if without:
            skeleton = self._resharded(current, list(range(current.num_shards)), self._fresh_shard_nodes(without))
            new = self.plan(skeleton, policy=self.policy)
            epoch = self.reshape(new, list(range(current.num_shards)), retire=[])
        events = []
        for node in joined:
            shards = [s for s, n in enumerate(new.shard_nodes) if n == node.node_id]
            experts = sum(new.num_physical(s) for s in shards)
            events.append(
                self._event(
                    "node_joined", node.node_id, f"joined (speed {node.speed:g})", epoch, detected_at=detected,
                    shards_added=len(shards), experts=experts, time_to_serve_s=time.time() - detected,
                )
            )  # fmt: skip
        return events

    def _fresh_shard_nodes(self, nodes) -> list[str]:
        if not nodes:
            raise ConfigError("no live node is left to hold the experts; add a node")
        return [n.node_id for n in nodes for _ in range(self.shards_per_node)]

    def _resharded(self, current: Placement, keep: list[int], fresh: list[str]) -> Placement:
        names = [f"shard-{next(self._names)}" for _ in fresh]
        speeds = [self._speed(n) for n in [current.shard_nodes[s] for s in keep] + fresh]
        return reshard(current, keep, fresh, names, speeds)
