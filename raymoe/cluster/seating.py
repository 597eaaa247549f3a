"""Speculative token placement at the front: seat each new request on the decode worker whose
node holds most of its predicted experts, under a per-worker cap (DESIGN.md, request path step 3).

The prediction is what the system has seen of the request: its prompt's routing, which the
prefill worker hands over (`Handoff.routing`, `[moe layers, experts]` pairs). The choice is the
pure `raymoe.policies.token_placement.seat_requests`; here the live placement becomes the
policies' view (`held_on_nodes`). Lossless either way: a wrong guess only costs a remote row.
"""

from __future__ import annotations

import numpy as np
import ray

from raymoe.cluster.placement import Placement
from raymoe.policies.token_placement import node_affinity, node_caps, reseat_requests, seat_requests

CAP_SLACK = 0.1  # a worker may take this much more than its share of the running requests
RESEAT_GAIN = 0.05  # a running request moves when its local share would rise by more than this


def held_on_nodes(placement: Placement, moe_layers: list[int], num_experts: int, nodes: list[str]) -> np.ndarray:
    """`[moe layers, experts, nodes]` 1 where a node holds a replica of the expert (on any shard);
    `nodes` may repeat (two workers on one node)."""
    unique = list(dict.fromkeys(nodes))
    index = {n: i for i, n in enumerate(unique)}
    held = np.zeros((len(moe_layers), num_experts, len(unique)), dtype=np.int64)
    for i, layer in enumerate(moe_layers):
        for e in range(num_experts):
            for s in placement.expert_to_shards.get((layer, e), ()):
                n = index.get(placement.shard_nodes[s])
                if n is not None:
                    held[i, e, n] = 1
    return held[:, :, [index[n] for n in nodes]]


class Seating:
    """Seats requests over decode workers from the controller's current placement."""

    def __init__(self, controller, moe_layers: list[int], num_experts: int, cap_slack: float = CAP_SLACK,
                 reseat_gain: float = RESEAT_GAIN):  # fmt: skip
        self.controller, self.moe_layers, self.num_experts = controller, moe_layers, num_experts
        self.cap_slack, self.reseat_gain = cap_slack, reseat_gain
        self.num_seated, self.num_reseated = 0, 0

    def affinity(self, routings: list[np.ndarray], worker_nodes: list[str]) -> np.ndarray:
        """`[requests, workers]` share of each request's predicted pairs held on each worker's node."""
        placement, _ = ray.get(self.controller.placement.remote())
        held = held_on_nodes(placement, self.moe_layers, self.num_experts, worker_nodes)
        return node_affinity(np.stack(routings).astype(np.float64), held)

    def seat(self, routings: list[np.ndarray | None], worker_nodes: list[str], running: list[int]) -> list[int]:
        """Worker index for each new request (`routings[i]`: its prompt's routing, or None: least
        loaded); `running[w]`: requests worker w runs now."""
        count = np.array(running, dtype=np.int64)
        caps = node_caps(int(count.sum()) + len(routings), np.ones(len(worker_nodes)), self.cap_slack)
        known = [i for i, r in enumerate(routings) if r is not None]
        seats = [-1] * len(routings)
        if known:
            affinity = self.affinity([routings[i] for i in known], worker_nodes)
            for i, w in zip(known, seat_requests(affinity, count, caps)):
                seats[i] = int(w)
            self.num_seated += len(known)
        for i in [i for i, s in enumerate(seats) if s < 0]:
            seats[i] = int(np.argmin(count))
            count[seats[i]] += 1
        return seats

    def reseat(self, routings: list[np.ndarray], seats: list[int], worker_nodes: list[str],
               running: list[int]) -> list[int | None]:
        """For running requests (their routing so far, current seat): the worker each should move
        to, or None to stay (`reseat_requests`: all choose afresh under the caps; a move must gain
        more than `reseat_gain` of predicted local share)."""
        caps = node_caps(int(sum(running)), np.ones(len(worker_nodes)), self.cap_slack)
        new = reseat_requests(self.affinity(routings, worker_nodes), np.array(seats), caps, self.reseat_gain)
        moves = [int(n) if n != s else None for n, s in zip(new, seats)]
        self.num_reseated += sum(m is not None for m in moves)
        return moves
