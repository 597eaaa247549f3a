"""The decode deployment's Ray Serve request router: speculative token placement (DESIGN.md,
request path step 3), as Ray Serve LLM's prefix-cache affinity router ranks replicas by cache.

A request handed over by the prefill carries its prompt's routing (`WorkRequest.routing`,
`[moe layers, experts]` pairs). Replicas are ranked by the share of those pairs held on their node
(`RunningReplica.node_id`, placement from the controller, re-read every `refresh_s`); a replica at
its cap (its speed share of the running requests, plus slack, from the queue lengths Serve caches)
drops to the last rank. Within a rank Serve takes the shortest queue. Requests without routing
(and when no placement is known) rank every replica alike, as the default router does.
"""

from __future__ import annotations

import time

import numpy as np
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from raymoe.policies.token_placement import node_affinity, node_caps

CAP_SLACK = 0.1


class ExpertAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, namespace: str = "raymoe-serve", refresh_s: float = 2.0, cap_slack: float = CAP_SLACK):
        self.namespace, self.refresh_s, self.cap_slack = namespace, refresh_s, cap_slack
        self._placement, self._read_at, self._controller = None, 0.0, None
        self.num_seated = 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:  # fmt: skip
        routing = _routing(pending_request)
        placement = await self._current_placement() if routing is not None else None
        if placement is None or len(candidate_replicas) < 2:
            return [candidate_replicas]
        return self.rank(candidate_replicas, routing, placement)

    def rank(self, replicas: list[RunningReplica], routing: np.ndarray, placement) -> list[list[RunningReplica]]:
        """Ranks: by affinity, best first; replicas at their cap last."""
        from raymoe.cluster.seating import held_on_nodes

        nodes = [r.node_id for r in replicas]
        held = held_on_nodes(placement, self.moe_layers(placement), routing.shape[1], nodes)
        affinity = node_affinity(routing[None].astype(np.float64), held)[0]  # [replicas]
        queue = np.array([self._replica_queue_len_cache.get(r.replica_id) or 0 for r in replicas])
        caps = node_caps(int(queue.sum()) + 1, np.ones(len(replicas)), self.cap_slack)
        ranks: dict[float, list[RunningReplica]] = {}  # affinity -> replicas with room, best first
        full = []
        for i in np.argsort(-affinity, kind="stable"):
            if queue[i] < caps[i]:
                ranks.setdefault(float(affinity[i]), []).append(replicas[i])
            else:
                full.append(replicas[i])
        self.num_seated += 1
        return list(ranks.values()) + ([full] if full else [])

    @staticmethod
    def moe_layers(placement) -> list[int]:
        return sorted({layer for layer, _ in placement.expert_to_shards})

    async def _current_placement(self):
        if time.monotonic() - self._read_at < self.refresh_s and self._placement is not None:
            return self._placement
        try:
            if self._controller is None:
                import ray

                from raymoe.cluster.controller import CONTROLLER_NAME

                self._controller = ray.get_actor(CONTROLLER_NAME, namespace=self.namespace)
            self._placement, _ = await self._controller.placement.remote()
            self._read_at = time.monotonic()
        except Exception:  # noqa: BLE001 (no controller yet, or it is restarting: rank alike meanwhile)
            self._controller = None
        return self._placement


def _routing(pending_request: PendingRequest | None) -> np.ndarray | None:
    if pending_request is None or not pending_request.args:
        return None
    routing = getattr(pending_request.args[0], "routing", None)
    return None if routing is None else np.asarray(routing)
