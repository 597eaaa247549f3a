"""Routing traces: load recorded decode routing, and form decode batches as a server does.

A trace file holds one sequence's decode: one row per (generated token, MoE layer) with the
token's top-k experts. Here each sequence becomes `experts [tokens, layers, k]`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raymoe.errors import RaymoeError


class TraceError(RaymoeError, ValueError):
    """A trace folder or file that cannot be read as routing; the message says what to fix."""


@dataclass(frozen=True)
class SequenceTrace:
    experts: np.ndarray  # [tokens, layers, k] int64, router-score order
    token_ids: np.ndarray  # [tokens] generated token ids
    weights: np.ndarray | None = None  # [tokens, layers, k] float32 router weights, if recorded

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]


@dataclass(frozen=True)
class Trace:
    name: str
    sequences: tuple[SequenceTrace, ...]
    num_experts: int

    @property
    def num_layers(self) -> int:
        return self.sequences[0].experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.sequences[0].experts.shape[2]

    def all_tokens(self) -> np.ndarray:
        """`[tokens, layers, k]` every sequence's tokens, concatenated."""
        return np.concatenate([s.experts for s in self.sequences])


def load_sequence(path: Path) -> SequenceTrace:
    """One `sequence_NNNN.npz` as `[tokens, layers, k]`."""
    data = np.load(path)
    # Rows arrive in event order; sorting makes the [token, layer] layout explicit.
    order = np.lexsort((data["layer_index"], data["generated_token_index"]))
    layers = int(data["layer_index"].max()) + 1
    experts = data["requested_expert_ids"][order].astype(np.int64)
    if len(order) % layers:
        raise TraceError(f"{path}: {len(order)} rows is not a whole number of {layers} layers")
    token_ids = data["token_id"][order][::layers]
    shape = (-1, layers, experts.shape[1])
    weights = None
    if "router_weights" in data.files:
        weights = data["router_weights"][order].astype(np.float32).reshape(shape)
    return SequenceTrace(experts.reshape(shape), token_ids, weights)


def load_trace(directory: str | Path, num_experts: int | None = None) -> Trace:
    """All `sequence_*.npz` files directly in `directory` as one trace."""
    directory = Path(directory)
    paths = sorted(directory.glob("sequence_*.npz"))
    if not paths:
        raise TraceError(
            f"{directory} holds no sequence_*.npz files: point at a domain folder such as "
            "traces/olmoe-1b-7b/general"
        )
    sequences = tuple(load_sequence(p) for p in paths)
    if num_experts is None:
        num_experts = _num_experts_from_metadata(paths[0]) or 1 + max(
            int(s.experts.max()) for s in sequences
        )
    return Trace(directory.name, sequences, num_experts)


def load_domains(root: str | Path) -> dict[str, Trace]:
    """Each subfolder of `root` that holds sequences, as `{domain: Trace}`."""
    root = Path(root)
    folders = [d for d in sorted(root.iterdir()) if d.is_dir() and any(d.glob("sequence_*.npz"))]
    if not folders:
        raise TraceError(f"{root} has no subfolders with sequence_*.npz files")
    return {d.name: load_trace(d) for d in folders}


def _num_experts_from_metadata(npz_path: Path) -> int | None:
    meta = npz_path.with_suffix(".metadata.json")
    if not meta.exists():
        return None
    return json.loads(meta.read_text()).get("num_experts")


@dataclass(frozen=True)
class DecodeBatches:
    """Decode steps of a server running `batch` concurrent sequences.

    experts: `[steps, batch, layers, k]` each running request's token at that step.
    request: `[steps, batch]` request id (index into request_sequence).
    position: `[steps, batch]` the token's index within its sequence.
    request_sequence: `[requests]` which trace sequence each request replays.
    """

    experts: np.ndarray
    request: np.ndarray
    position: np.ndarray
    request_sequence: np.ndarray

    @property
    def num_steps(self) -> int:
        return self.experts.shape[0]


def decode_batches(trace: Trace, batch_size: int, num_steps: int | None = None,
                   seed: int = 0) -> DecodeBatches:
    """Continuous batching in steady state: each step takes one token from each of
    `batch_size` running requests; a finished request's slot takes the next queued one.

    Slots start at random points of their first request, because a server that has run a
    while holds requests of all ages, not all at token 0. Requests replay the trace's
    sequences in shuffled rounds, so `batch_size` may exceed the number of sequences.
    By default, enough steps to replay about every token once.
    """
    rng = np.random.default_rng(seed)
    lengths = np.array([s.num_tokens for s in trace.sequences])
    if num_steps is None:
        num_steps = max(1, int(lengths.sum()) // batch_size)
    queue = _RequestQueue(len(lengths), rng)
    request = np.empty((num_steps, batch_size), dtype=np.int64)
    position = np.empty((num_steps, batch_size), dtype=np.int64)
    for slot in range(batch_size):
        request[:, slot], position[:, slot] = _fill_slot(queue, lengths, num_steps, rng)
    request_sequence = np.array(queue.issued, dtype=np.int64)
    experts = _gather_experts(trace, request_sequence[request], position)
    return DecodeBatches(experts, request, position, request_sequence)


def request_batches(trace: Trace, sequence: np.ndarray, start: int, num_steps: int) -> DecodeBatches:
    """`len(sequence)` requests admitted together, request r replaying trace sequence
    `sequence[r]`, each decoding `num_steps` tokens from position `start` (as `raymoe replay`
    serves them). Past a sequence's end its tokens wrap around, as routing replay does."""
    sequence = np.asarray(sequence, dtype=np.int64)
    position = np.broadcast_to(start + np.arange(num_steps)[:, None], (num_steps, len(sequence)))
    experts = np.stack([[trace.sequences[s].experts[p % trace.sequences[s].num_tokens]
                         for s, p in zip(sequence, row)] for row in position])  # fmt: skip
    request = np.broadcast_to(np.arange(len(sequence)), position.shape)
    return DecodeBatches(experts, request.copy(), position.copy(), sequence)


class _RequestQueue:
    def __init__(self, num_sequences: int, rng: np.random.Generator):
        self.num_sequences, self.rng, self.issued, self._pending = num_sequences, rng, [], []

    def next(self) -> tuple[int, int]:
        """(request id, sequence index) of the next request to admit."""
        if not self._pending:
            self._pending = list(self.rng.permutation(self.num_sequences))
        self.issued.append(int(self._pending.pop()))
        return len(self.issued) - 1, self.issued[-1]


def _fill_slot(queue, lengths, num_steps, rng):
    requests, positions, start = [], [], None
    while sum(len(p) for p in positions) < num_steps:
        req, seq = queue.next()
        start = int(rng.integers(lengths[seq])) if start is None else 0
        pos = np.arange(start, lengths[seq])
        requests.append(np.full(len(pos), req))
        positions.append(pos)
    return np.concatenate(requests)[:num_steps], np.concatenate(positions)[:num_steps]


def _gather_experts(trace, sequence, position):
    offsets = np.cumsum([0] + [s.num_tokens for s in trace.sequences])
    flat = trace.all_tokens()  # [all tokens, layers, k]
    return flat[offsets[sequence] + position]
