"""Per-batch dispatch: which replica serves each token-expert pair, and the node loads that follow.

Lossless by construction: any replica of an expert computes the same output, so the choice
only moves load and traffic. Three rules:
  round_robin: spread each expert's pairs evenly over its replicas, blind to load and
      locality (what vLLM's EPLB does).
  balanced: per batch, water-fill each replicated expert's pairs onto its replicas' nodes,
      fastest-to-finish first, so the speed-weighted maximum node load is low.
  local_first: a pair whose token's node holds a replica stays there; the rest are balanced.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

DispatchMode = Literal["round_robin", "balanced", "local_first"]


def water_fill(loads: np.ndarray, speeds: np.ndarray, amount: float) -> np.ndarray:
    """Split `amount` over nodes so that the highest `(loads + share) / speeds` is lowest.

    loads, speeds: `[n]`. Returns the share per node `[n]`, summing to `amount`.
    """
    finish = loads / speeds
    order = np.argsort(finish, kind="stable")
    level, share = finish[order[0]], np.zeros(len(loads))
    rate = 0.0
    for i, node in enumerate(order):
        rate += speeds[node]
        next_level = finish[order[i + 1]] if i + 1 < len(order) else np.inf
        # Raising the water level from `level` to `next_level` absorbs rate * (gap) pairs.
        if amount <= rate * (next_level - level):
            level += amount / rate
            break
        amount -= rate * (next_level - level)
        level = next_level
    active = order[: i + 1]
    share[active] = level * speeds[active] - loads[active]
    return np.maximum(share, 0.0)


def layer_loads(pairs: np.ndarray, replicas: np.ndarray, speeds: np.ndarray,
                mode: DispatchMode) -> tuple[np.ndarray, np.ndarray]:
    """Node loads of one layer of one batch.

    pairs: `[experts, nodes]` token-expert pairs per expert, by the node of the token.
    replicas: `[experts, nodes]` replicas of each expert on each node.
    Returns (node load `[nodes]`, pairs each node serves for its own tokens `[nodes]`).
    """
    if mode == "round_robin":
        share = replicas / replicas.sum(1, keepdims=True)  # [E, N]
        return pairs.sum(1) @ share, (pairs * share).sum(0)
    held = replicas > 0
    if mode == "local_first":
        kept = np.where(held, pairs, 0.0)  # [E, N] pairs that stay on their node
    else:
        kept = np.zeros_like(pairs, dtype=np.float64)
    remote = pairs.sum(1) - kept.sum(1)  # [E]
    single = held.sum(1) == 1
    loads = kept.sum(0) + (remote * single) @ held
    local = kept.sum(0) + ((pairs * held)[single].sum(0) if mode == "balanced" else 0.0)
    multi = np.flatnonzero(~single & (remote > 0))
    for e in multi[np.argsort(-remote[multi], kind="stable")]:
        nodes = np.flatnonzero(held[e])
        share = water_fill(loads[nodes], speeds[nodes], remote[e])
        loads[nodes] += share
        if mode == "balanced":
            # Within its share, a node serves its own tokens first: same load, less traffic.
            local[nodes] += np.minimum(share, pairs[e, nodes])
    return loads, local
