"""Co-located experts: what a worker runs in its own process, and where its rows went.

A worker co-hosts every expert the placement puts on its own node (`node_experts`) through a
`LocalHolder` (`raymoe.actors.expert_shard.ExpertShardCore`); `RemoteExperts` runs those rows in
process and sends only the others (`raymoe.cluster.dispatch`). `DispatchCounts` tallies the rows:
in process, crossing a process, crossing a node, per token, and the local activation rate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from raymoe.cluster.placement import ExpertKey, Placement


class LocalHolder(Protocol):
    """The experts a worker co-hosts (`raymoe.actors.expert_shard.ExpertShardCore` is one)."""

    def holds(self, layer: int, expert: int) -> bool: ...
    def held(self) -> list[ExpertKey]: ...
    def load(self, experts: Iterable[ExpertKey]) -> None: ...
    def free(self, experts: Iterable[ExpertKey]) -> None: ...
    def run(self, layer: int, rows: torch.Tensor, expert_ids: list[int], counts: list[int]) -> torch.Tensor: ...


@dataclass
class DispatchCounts:
    """Where routed rows (token-expert pairs) went, cumulative. A token is counted once per forward
    (token_layers / MoE layers); resent rows (a shard died) count again."""

    pairs: int = 0  # token-expert pairs routed
    token_layers: int = 0  # tokens summed over MoE layer calls
    rows_local: int = 0  # run in this process, no transport
    rows_process: int = 0  # sent to another process (this node or another)
    rows_node: int = 0  # sent to another node

    def summary(self, num_moe_layers: int) -> dict:
        """The counts plus local activation rate (share of pairs served on the token's node) and
        rows crossing a process / a node per token."""
        tokens = self.token_layers / max(1, num_moe_layers)
        return {
            **asdict(self),
            "tokens": tokens,
            "local_activation_rate": 1.0 - self.rows_node / self.pairs if self.pairs else None,
            "rows_crossing_process_per_token": self.rows_process / tokens if tokens else None,
            "rows_crossing_node_per_token": self.rows_node / tokens if tokens else None,
        }


def node_experts(placement: Placement, node_id: str | None) -> set[ExpertKey]:
    """The experts `placement` puts on `node_id` (on any of its shards)."""
    on_node = {s for s, node in enumerate(placement.shard_nodes) if node == node_id}
    return {key for key, shards in placement.expert_to_shards.items() if on_node.intersection(shards)}
