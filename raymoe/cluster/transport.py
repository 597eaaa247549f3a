"""How a slice of expert rows travels from a worker to a shard and back.

One interface, two implementations chosen by device: `ActorCallTransport` (plain Ray actor calls;
tensors go inline or through the object store) for CPU, the default by measurement (see
docs/transport.md), and `CollectiveTransport` in `transport_nccl` (NCCL through cupy) for GPUs.

`wait` never raises for one shard's death: it returns a `ShardFailure` in that slot so the caller
can resend just that slice to another replica. It raises `ShardTimeoutError` when a slice does not
come back in time (a hung shard is not silently retried elsewhere).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from raymoe.errors import RaymoeError

DEFAULT_TIMEOUT_S = 120.0


class ShardTimeoutError(RaymoeError, TimeoutError):
    """An expert shard did not answer in time; check the shard's node (`ray status`) and logs."""


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


class ActorCallTransport(Transport):
    """One Ray actor call per slice: `shard.run.remote(layer, rows, expert_ids, counts)`."""

    def __init__(self, handles: list):
        self.handles = list(handles)

    def set_handles(self, handles: list) -> None:
        self.handles = list(handles)

    def send(self, shard_index, layer, rows, expert_ids, counts) -> Sent:
        return Sent(shard_index, self.handles[shard_index].run.remote(layer, rows, expert_ids, counts))

    def wait(self, sent, timeout_s=DEFAULT_TIMEOUT_S):
        import ray

        refs = [s.ref for s in sent]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s, fetch_local=True)
        if pending:
            late = [s.shard_index for s in sent if s.ref in pending]
            raise ShardTimeoutError(f"expert shards {late} did not answer within {timeout_s}s")
        try:
            return [ShardOutput(*reply) for reply in ray.get(refs, timeout=timeout_s)]
        except ray.exceptions.RayError:
            return [self._one(s) for s in sent]  # someone failed: sort out who

    @staticmethod
    def _one(sent: Sent) -> ShardOutput | ShardFailure:
        import ray

        try:
            return ShardOutput(*ray.get(sent.ref, timeout=DEFAULT_TIMEOUT_S))
        except ray.exceptions.RayError as e:
            if isinstance(e, ray.exceptions.GetTimeoutError):
                raise ShardTimeoutError(f"expert shard {sent.shard_index} did not answer") from e
            return ShardFailure(sent.shard_index, e, is_dead_shard_error(e))
