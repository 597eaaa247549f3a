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


def pair_counts(first: np.ndarray, second: np.ndarray, num_experts: int) -> np.ndarray:
    """`[layers, experts, experts]` tokens with expert e in `first` and f in `second`.

    first, second: `[T, layers, k]` (the same array for co-activation, consecutive layers
    for transitions).
    """
    num_layers = first.shape[1]
    layer = np.arange(num_layers)[None, :, None, None]
    cell = (layer * num_experts + first[..., :, None]) * num_experts + second[..., None, :]
    counts = np.bincount(cell.ravel(), minlength=num_layers * num_experts * num_experts)
    return counts.reshape(num_layers, num_experts, num_experts).astype(np.float64)


def coactivation(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """`[layers, experts, experts]` how often two experts serve the same token at a layer."""
    return pair_counts(experts, experts, num_experts)


def sequence_profiles(sequences: list[np.ndarray], num_experts: int) -> np.ndarray:
    """`[sequences, layers, experts]` each sequence's share of tokens using each expert.

    Normalised per sequence so that long sequences do not outvote short ones.
    """
    return np.stack(
        [expert_load(s, num_experts) / max(1, s.shape[0]) for s in sequences]
    )


class Calibration:
    """What a policy plans from: per-expert load and per-request expert profiles.

    load: `[layers, experts]` token-expert pairs; profiles: `[requests, layers, experts]`.
    """

    def __init__(self, load: np.ndarray, profiles: np.ndarray, name: str = "",
                 request_ids: np.ndarray | None = None):
        self.load, self.profiles, self.name = load, profiles, name
        self.request_ids = request_ids  # [requests] served request ids, for a window
        self.request_node: np.ndarray | None = None  # [requests] where they run, if known

    @classmethod
    def from_trace(cls, trace) -> "Calibration":
        sequences = [s.experts for s in trace.sequences]
        return cls(expert_load(trace.all_tokens(), trace.num_experts),
                   sequence_profiles(sequences, trace.num_experts), trace.name)

    @classmethod
    def from_window(cls, experts: np.ndarray, request: np.ndarray, num_experts: int,
                    name: str = "window") -> "Calibration":
        """From served decode steps: experts `[steps, batch, layers, k]`, request `[steps, batch]`.

        This is what a controller sees: the routing of the steps it just served.
        """
        ids, index = np.unique(request.ravel(), return_inverse=True)
        num_layers, k = experts.shape[2:]
        flat = experts.reshape(-1, num_layers, k)
        cell = (index[:, None, None] * num_layers + np.arange(num_layers)[None, :, None]) \
            * num_experts + flat
        counts = np.bincount(cell.ravel(), minlength=len(ids) * num_layers * num_experts)
        profiles = counts.reshape(len(ids), num_layers, num_experts).astype(np.float64)
        profiles /= np.bincount(index, minlength=len(ids))[:, None, None]
        return cls(expert_load(flat, num_experts), profiles, name, ids)
