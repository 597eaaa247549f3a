"""Lift a recorded trace onto a larger model's shape, for simulation at a scale with no trace.

No DeepSeek-V3 routing is recorded here. To still replay something with real skew and
co-activation at its scale, each target layer reuses a source layer (cyclically), and each
source expert becomes a block of `target / source` experts; which member of the block a
token uses is fixed by its token id, so a sequence keeps its habits. Each target layer's
expert ids are then shuffled by a fixed permutation so that layers differ. The result is
synthetic, derived from real routing; results on it say so.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from raymoe.policies.traces import SequenceTrace, Trace


def lift_trace(trace: Trace, num_layers: int, num_experts: int, seed: int = 0) -> Trace:
    """`trace` as if routed by a model with `num_layers` MoE layers of `num_experts` experts."""
    if num_experts % trace.num_experts:
        raise ValueError(f"num_experts={num_experts} must be a multiple of the trace's {trace.num_experts}")
    rng = np.random.default_rng(seed)
    block = num_experts // trace.num_experts
    source = np.arange(num_layers) % trace.num_layers  # [target layers]
    shuffle = np.stack([rng.permutation(num_experts) for _ in range(num_layers)])  # [L, E]
    salt = rng.integers(1 << 30, size=num_layers)
    sequences = tuple(_lift(s, source, shuffle, salt, block) for s in trace.sequences)
    return replace(trace, name=f"{trace.name}-lifted", sequences=sequences, num_experts=num_experts)


def _lift(seq: SequenceTrace, source, shuffle, salt, block) -> SequenceTrace:
    experts = seq.experts[:, source, :]  # [T, L, k]
    member = (
        seq.token_ids[:, None, None] * 1000003 + salt[None, :, None] + np.arange(experts.shape[2])[None, None, :] * 7919
    ) % block
    lifted = experts * block + member
    layer = np.arange(len(source))[None, :, None]
    return SequenceTrace(shuffle[layer, lifted], seq.token_ids)
