"""How a slice of expert rows travels from a worker to a shard and back.

One interface, two implementations chosen by device: `ActorCallTransport` (plain Ray actor calls)
for CPU, the default by measurement (docs/transport.md), and `CollectiveTransport` in
`transport_nccl` (NCCL through cupy) for GPUs.

Ray puts an argument or return value over 100 KiB (`max_direct_call_object_size`) into the object
store, which costs a store round trip each way (~20 ms on the test machine for a 256 KiB slice
crossing nodes); smaller ones ride inside the task RPC. So `ActorCallTransport` ships rows as raw
bytes (numpy: cheaper to pickle than torch tensors) in chunks under that limit, both ways
(`num_returns` = chunks + 1), as long as the whole slice stays small; big prefill slices go as one
object, where the store's bandwidth wins.

`wait` never raises for one shard's death: it returns a `ShardFailure` in that slot so the caller
can resend just that slice to another replica. It raises `ShardTimeoutError` when a slice does not
come back in time (a hung shard is not silently retried elsewhere).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from raymoe.errors import RaymoeError

DEFAULT_TIMEOUT_S = 120.0
INLINE_BYTES = int(os.environ.get("RAY_max_direct_call_object_size", 100 * 1024)) - 4096  # minus pickle framing
MAX_INLINE_SLICE_BYTES = 4 << 20  # above this, one object-store object beats many inline chunks


class ShardTimeoutError(RaymoeError, TimeoutError):
    """An expert shard did not answer in time; check the shard's node (`ray status`) and logs."""


class ExpertNotHeldError(RaymoeError):
    """A shard was sent rows for an expert it does not hold (a stale placement: re-route)."""


class ShardOutput(NamedTuple):
    rows: torch.Tensor  # [N, H] expert outputs, in the order the rows were sent
    compute_s: float  # the shard's own compute time for them


@dataclass
class ShardFailure:
    shard_index: int
    error: BaseException
    is_dead: bool  # the actor died or is unreachable (else: it refused, e.g. a stale placement)


class Sent(NamedTuple):
    shard_index: int
    ref: Any  # transport-specific handle of the reply


class Transport(ABC):
    """Sends row slices to shards by index (of the current placement) and gathers the replies."""

    @abstractmethod
    def set_handles(self, handles: list) -> None:
        """The shard actors, indexed like the placement's shards (called when the placement switches)."""

    @abstractmethod
    def send(
        self, shard_index: int, layer: int, rows: torch.Tensor, expert_ids: list[int], counts: list[int]
    ) -> Sent:
        """Start running `rows` [N, H] (contiguous groups of `expert_ids` with `counts` rows) on a shard."""

    @abstractmethod
    def wait(self, sent: list[Sent], timeout_s: float = DEFAULT_TIMEOUT_S) -> list[ShardOutput | ShardFailure]:
        """The replies of `sent`, in order."""


def is_dead_shard_error(error: BaseException) -> bool:
    """RayActorError covers ActorDiedError and ActorUnavailableError."""
    from ray.exceptions import RayActorError

    return isinstance(error, RayActorError)


def to_wire(rows: torch.Tensor, inline: bool = True) -> tuple[str, list[np.ndarray]]:
    """rows [N, H] (any dtype, bfloat16 too) -> (dtype name, uint8 chunks [n_i, H * itemsize])."""
    raw = rows.contiguous().view(torch.uint8).numpy()
    per_chunk = max(1, INLINE_BYTES // max(1, raw.shape[1]))
    if not inline or raw.nbytes > MAX_INLINE_SLICE_BYTES or raw.shape[0] <= per_chunk:
        return _dtype_name(rows.dtype), [raw]
    return _dtype_name(rows.dtype), [raw[i : i + per_chunk] for i in range(0, raw.shape[0], per_chunk)]


def from_wire(dtype: str, chunks: list[np.ndarray]) -> torch.Tensor:
    raw = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
    if not raw.flags.writeable:  # deserialized buffers can be read-only; torch wants to own writable memory
        raw = raw.copy()
    return torch.from_numpy(raw).view(getattr(torch, dtype))


def split_like(rows: torch.Tensor, sizes: list[int]) -> list[np.ndarray]:
    """Outputs [N, H] -> uint8 chunks of the given row counts (a reply mirrors its request's chunks)."""
    raw = rows.contiguous().view(torch.uint8).numpy()
    return list(np.split(raw, np.cumsum(sizes)[:-1])) if len(sizes) > 1 else [raw]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class ActorCallTransport(Transport):
    """One Ray actor call per slice: `shard.run_wire` with the rows as inline byte chunks
    (`inline=False`: one tensor argument and return, the plain way, kept as the bench's baseline)."""

    def __init__(self, handles: list, inline: bool = True):
        self.handles, self.inline = list(handles), inline

    def set_handles(self, handles: list) -> None:
        self.handles = list(handles)

    def send(self, shard_index, layer, rows, expert_ids, counts) -> Sent:
        shard = self.handles[shard_index]
        if not self.inline:
            return Sent(shard_index, _Call(None, [shard.run.remote(layer, rows, expert_ids, counts)]))
        dtype, chunks = to_wire(rows)
        refs = shard.run_wire.options(num_returns=len(chunks) + 1).remote(layer, expert_ids, counts, dtype, *chunks)
        return Sent(shard_index, _Call(dtype, refs))

    def wait(self, sent, timeout_s=DEFAULT_TIMEOUT_S):
        import ray

        refs = [r for s in sent for r in s.ref.refs]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s, fetch_local=True)
        if pending:
            late = sorted({s.shard_index for s in sent if any(r in pending for r in s.ref.refs)})
            raise ShardTimeoutError(f"expert shards {late} did not answer within {timeout_s}s")
        try:
            values = iter(ray.get(refs, timeout=timeout_s))
            return [s.ref.output([next(values) for _ in s.ref.refs]) for s in sent]
        except ray.exceptions.RayError:
            return [self._one(s) for s in sent]  # someone failed: sort out who

    @staticmethod
    def _one(sent: Sent) -> ShardOutput | ShardFailure:
        import ray

        try:
            return sent.ref.output(ray.get(sent.ref.refs, timeout=DEFAULT_TIMEOUT_S))
        except ray.exceptions.RayError as e:
            if isinstance(e, ray.exceptions.GetTimeoutError):
                raise ShardTimeoutError(f"expert shard {sent.shard_index} did not answer") from e
            return ShardFailure(sent.shard_index, e, is_dead_shard_error(e))


@dataclass
class _Call:
    """One actor call in flight: `run_wire` (dtype set: refs = output chunks + compute seconds) or
    plain `run` (dtype None: one ref to (rows, compute seconds))."""

    dtype: str | None
    refs: list

    def output(self, values: list) -> ShardOutput:
        if self.dtype is None:
            return ShardOutput(*values[0])
        return ShardOutput(from_wire(self.dtype, values[:-1]), values[-1])
