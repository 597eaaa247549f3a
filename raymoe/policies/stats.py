"""Routing statistics the policies plan from: per-expert load and co-activation."""

from __future__ import annotations

import numpy as np


def expert_load(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """`[layers, experts]` token-expert pairs per expert, from `experts [..., layers, k]`."""
    num_layers = experts.shape[-2]
    flat = experts.reshape(-1, num_layers, experts.shape[-1])  # [T, L, k]
    index = flat + num_experts * np.arange(num_layers)[None, :, None]
    counts = np.bincount(index.ravel(), minlength=num_layers * num_experts)
    return counts.reshape(num_layers, num_experts).astype(np.float64)


def one_hot(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """`[T, layers, experts]` 0/1, from `experts [T, layers, k]`."""
    out = np.zeros(experts.shape[:2] + (num_experts,), dtype=np.float32)
    t, layer = np.indices(experts.shape[:2])
    out[t[..., None], layer[..., None], experts] = 1.0
    return out


def coactivation(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """`[layers, experts, experts]` how often two experts serve the same token at a layer."""
    hot = one_hot(experts, num_experts)  # [T, L, E]
    return np.einsum("tle,tlf->lef", hot, hot, optimize=True).astype(np.float64)


def sequence_profiles(sequences: list[np.ndarray], num_experts: int) -> np.ndarray:
    """`[sequences, layers, experts]` each sequence's share of tokens using each expert.

    Normalised per sequence so that long sequences do not outvote short ones.
    """
    return np.stack(
        [expert_load(s, num_experts) / max(1, s.shape[0]) for s in sequences]
    )
