"""Placement: which shard holds which physical experts, and on which node each shard runs.

A logical expert is `(layer, expert)`; each copy of it on a shard is a physical expert (a replica).
`Placement.expert_to_shards[(layer, expert)]` lists the shards holding a replica; the epoch numbers
the placement's versions (a new placement is published with epoch + 1).

Builders here are plain: `contiguous_placement` (blocks of experts sized by shard weight, replicas
on the following shards), `speed_weighted_placement` (replicate hot experts, then pack physical
experts greedily onto the shard that finishes them first given its speed) and `reshard` (the same
experts over a changed set of shards, as nodes join and leave).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from raymoe.errors import RaymoeError

ExpertKey = tuple[int, int]  # (layer, logical expert)


class PlacementError(RaymoeError, ValueError):
    """A placement that is inconsistent or does not cover the model's experts."""


@dataclass(frozen=True)
class Placement:
    epoch: int
    shard_names: tuple[str, ...]  # [S] for logs and status
    shard_nodes: tuple[str, ...]  # [S] Ray node id each shard runs on
    expert_to_shards: dict[ExpertKey, tuple[int, ...]] = field(default_factory=dict)  # replicas; never mutate

    def __post_init__(self):
        if len(self.shard_names) != len(self.shard_nodes):
            raise PlacementError(f"{len(self.shard_names)} shard names but {len(self.shard_nodes)} shard nodes")
        if not self.shard_names:
            raise PlacementError("a placement needs at least one shard")
        for key, shards in self.expert_to_shards.items():
            if not shards:
                raise PlacementError(f"expert {key} has no replica; give it at least one shard")
            if len(set(shards)) != len(shards):
                raise PlacementError(f"expert {key} has two replicas on one shard: {shards}")
            if not all(0 <= s < self.num_shards for s in shards):
                raise PlacementError(f"expert {key} names shards {shards}; valid are 0..{self.num_shards - 1}")

    @property
    def num_shards(self) -> int:
        return len(self.shard_names)

    def shards_for(self, layer: int, expert: int) -> tuple[int, ...]:
        try:
            return self.expert_to_shards[(layer, expert)]
        except KeyError:
            raise PlacementError(f"expert {(layer, expert)} is not placed on any shard") from None

    def experts_on(self, shard: int) -> list[ExpertKey]:
        return sorted(key for key, shards in self.expert_to_shards.items() if shard in shards)

    def num_physical(self, shard: int) -> int:
        return sum(shard in shards for shards in self.expert_to_shards.values())

    def with_epoch(self, epoch: int) -> Placement:
        return replace(self, epoch=epoch)

    def check_covers(self, moe_layers: Sequence[int], num_experts: int) -> None:
        """Raise unless every routed expert of the model has a replica."""
        missing = [(lay, e) for lay in moe_layers for e in range(num_experts) if (lay, e) not in self.expert_to_shards]
        if missing:
            raise PlacementError(f"{len(missing)} experts have no shard, e.g. {missing[:4]}; place every expert")


def block_sizes(num_experts: int, weights: Sequence[float]) -> list[int]:
    """Split `num_experts` into len(weights) block sizes proportional to weights (largest remainder)."""
    w = np.asarray(weights, dtype=float)
    if len(w) == 0 or (w <= 0).any():
        raise PlacementError(f"shard weights must be positive, got {list(weights)}")
    ideal = num_experts * w / w.sum()
    sizes = np.floor(ideal).astype(int)
    for i in np.argsort(-(ideal - sizes), kind="stable")[: num_experts - sizes.sum()]:
        sizes[i] += 1
    return sizes.tolist()


def contiguous_placement(
    moe_layers: Sequence[int],
    num_experts: int,
    shard_nodes: Sequence[str],
    *,
    replicas: int = 1,
    shard_weights: Sequence[float] | None = None,
    shard_names: Sequence[str] | None = None,
    epoch: int = 0,
) -> Placement:
    """Experts in contiguous blocks over the shards (sized by `shard_weights`, default equal); replica
    j of an expert sits j shards after its home shard, so replicas are on distinct shards."""
    num_shards = len(shard_nodes)
    if not 1 <= replicas <= num_shards:
        raise PlacementError(f"replicas={replicas} needs 1 <= replicas <= shards ({num_shards})")
    sizes = block_sizes(num_experts, shard_weights or [1.0] * num_shards)
    home = np.repeat(np.arange(num_shards), sizes)  # [E] home shard of each expert
    mapping = {
        (layer, e): tuple(int(home[e] + j) % num_shards for j in range(replicas))
        for layer in moe_layers
        for e in range(num_experts)
    }
    names = tuple(shard_names or (f"shard-{s}" for s in range(num_shards)))
    return Placement(epoch, names, tuple(shard_nodes), mapping)


def replica_counts(load: np.ndarray, extra: int, max_replicas: int) -> np.ndarray:
    """load [E] -> replicas [E]: one each, then `extra` more, each to the expert with most load per copy."""
    counts = np.ones(len(load), dtype=int)
    for _ in range(extra):
        per_copy = np.where(counts < max_replicas, load / counts, -1.0)
        hottest = int(np.argmax(per_copy))  # first on ties: deterministic
        if per_copy[hottest] <= 0:
            break
        counts[hottest] += 1
    return counts


def pack_layer(
    load: np.ndarray, counts: np.ndarray, speeds: np.ndarray, current: list[set[int]] | None = None
) -> list[tuple[int, ...]]:
    """Physical experts, heaviest first, each onto the distinct shard where it finishes first:
    argmin (shard load + its load) / speed; ties keep a current holder, then the faster shard.
    Every expert also weighs one unit so zero-load experts still spread by speed. -> [E] shards."""
    shard_load = np.zeros(len(speeds))
    placed: list[list[int]] = [[] for _ in load]
    per_copy = load / counts + 1.0  # [E]
    copies = sorted((e for e in range(len(load)) for _ in range(counts[e])), key=lambda e: (-per_copy[e], e))
    for e in copies:
        free = [s for s in range(len(speeds)) if s not in placed[e]]
        kept = current[e] if current is not None else set()
        s = min(free, key=lambda s: ((shard_load[s] + per_copy[e]) / speeds[s], s not in kept, -speeds[s], s))
        placed[e].append(s)
        shard_load[s] += per_copy[e]
    return [tuple(sorted(p)) for p in placed]


def speed_weighted_placement(
    load: np.ndarray,
    moe_layers: Sequence[int],
    shard_nodes: Sequence[str],
    shard_speeds: Sequence[float],
    *,
    extra_replicas: int = 0,
    current: Placement | None = None,
    shard_names: Sequence[str] | None = None,
    epoch: int = 0,
) -> Placement:
    """load [layers, experts] token counts (rows indexed by model layer id) -> a placement where the
    hottest experts get `extra_replicas` more copies per layer and faster shards take more work."""
    speeds = np.asarray(shard_speeds, dtype=float)
    if len(speeds) != len(shard_nodes) or (speeds <= 0).any():
        raise PlacementError(f"need one positive speed per shard, got {list(shard_speeds)} for {len(shard_nodes)}")
    num_experts = load.shape[1]
    mapping: dict[ExpertKey, tuple[int, ...]] = {}
    for layer in moe_layers:
        counts = replica_counts(load[layer].astype(float), extra_replicas, len(speeds))
        held = [set(current.expert_to_shards.get((layer, e), ())) for e in range(num_experts)] if current else None
        for e, shards in enumerate(pack_layer(load[layer].astype(float), counts, speeds, held)):
            mapping[(layer, e)] = shards
    names = tuple(shard_names or (current.shard_names if current else (f"shard-{s}" for s in range(len(speeds)))))
    return Placement(epoch, names, tuple(shard_nodes), mapping)


def reshard(
    current: Placement,
    keep: Sequence[int],
    new_nodes: Sequence[str],
    new_names: Sequence[str],
    shard_speeds: Sequence[float],
) -> Placement:
    """`current` over shards `keep` (old indices, in order) then one new, empty shard per `new_nodes`.

    Every expert keeps its replicas on kept shards. An expert left with none (all its shards gone)
    goes to the shard with the fewest physical experts of that layer per unit of speed (it is
    reloaded there from the checkpoint). shard_speeds: one per shard of the result. Epoch unchanged."""
    nodes = [current.shard_nodes[s] for s in keep] + list(new_nodes)
    names = [current.shard_names[s] for s in keep] + list(new_names)
    speeds = np.asarray(shard_speeds, dtype=float)
    if len(speeds) != len(nodes) or (speeds <= 0).any():
        raise PlacementError(f"need one positive speed per shard, got {list(shard_speeds)} for {len(nodes)}")
    index = {old: new for new, old in enumerate(keep)}
    mapping: dict[ExpertKey, tuple[int, ...]] = {}
    for key, shards in current.expert_to_shards.items():
        mapping[key] = tuple(index[s] for s in shards if s in index)
    for layer in sorted({layer for layer, _ in mapping}):
        held = np.zeros(len(nodes))
        for (lay, _), shards in mapping.items():
            if lay == layer:
                held[list(shards)] += 1
        for key in sorted(k for k, shards in mapping.items() if k[0] == layer and not shards):
            s = int(np.argmin((held + 1) / speeds))  # first on ties: deterministic
            mapping[key], held[s] = (s,), held[s] + 1
    return Placement(current.epoch, tuple(names), tuple(nodes), mapping)
