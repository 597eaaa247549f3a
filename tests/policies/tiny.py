"""Small synthetic traces for tests, and the path of the real ones."""

from pathlib import Path

import numpy as np
import pytest

from raymoe.policies.traces import SequenceTrace, Trace

TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces"
OLMOE = TRACES / "olmoe-1b-7b"
needs_traces = pytest.mark.skipif(not TRACES.is_dir(), reason="../shared/traces absent")


def tiny_trace(num_sequences=6, num_tokens=10, num_layers=2, num_experts=8, top_k=2,
               seed=0, name="tiny") -> Trace:
    """Sequences that each favour one half of the experts, so grouping has something to find."""
    rng = np.random.default_rng(seed)
    sequences = []
    for s in range(num_sequences):
        half = np.arange(num_experts // 2) + (s % 2) * (num_experts // 2)
        experts = np.stack([
            np.stack([rng.choice(half, top_k, replace=False) for _ in range(num_layers)])
            for _ in range(num_tokens)
        ])
        sequences.append(SequenceTrace(experts, rng.integers(0, 50, num_tokens)))
    return Trace(name, tuple(sequences), num_experts)


def write_npz(folder: Path, index: int, experts: np.ndarray, token_ids: np.ndarray,
              weights: np.ndarray | None = None) -> None:
    """One sequence in the recorded file layout, rows shuffled as a recorder might write them."""
    tokens, layers, k = experts.shape
    token, layer = np.meshgrid(np.arange(tokens), np.arange(layers), indexing="ij")
    order = np.random.default_rng(index).permutation(tokens * layers)
    extra = {} if weights is None else {"router_weights": weights.reshape(-1, k)[order].astype(np.float32)}
    np.savez(folder / f"sequence_{index:04d}.npz", **extra,
             generated_token_index=token.ravel()[order].astype(np.int32),
             layer_index=layer.ravel()[order].astype(np.int16),
             requested_expert_ids=experts.reshape(-1, k)[order].astype(np.int16),
             token_id=np.repeat(token_ids, layers)[order].astype(np.int32))


def write_tiny_trace(folder: Path, seed: int = 0, **shape) -> Trace:
    """`tiny_trace(**shape)` written as a trace folder, with random router weights; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    trace = tiny_trace(seed=seed, **shape)
    rng = np.random.default_rng(seed + 1)
    for i, seq in enumerate(trace.sequences):
        write_npz(folder, i, seq.experts, seq.token_ids, rng.uniform(0.05, 0.5, seq.experts.shape))
    return trace
