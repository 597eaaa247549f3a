"""GPU transport: expert rows between a worker and the shards over `ray.util.collective`
point-to-point send/recv, NCCL through cupy.

Import-guarded: this module imports neither cupy nor `ray.util.collective` at import time (the
latter pulls cupy in when it is installed), so a CPU install imports it fine and only
`CollectiveTransport(backend="nccl")` needs `pip install 'raymoe[gpu]'`. The same code runs with
backend "gloo" (torch.distributed) on CPU, which `bench/transport.py` measures.

Protocol of one round trip, worker = rank 0 of a group with every shard (shard i = rank i + 1):
  worker: shard.run_collective.remote(meta); send(rows -> shard); ...; recv(outputs <- shard)
  shard:  recv(rows <- worker); run; send(outputs -> worker)
The metadata call carries the row count and dtype, so both sides agree on the buffer's shape: a
mismatch would hang the collective, so the shard always answers with a tensor of that shape.
Limits: the caller must be a Ray actor; a dead shard breaks the group (the worker's recv times
out), so `set_handles` with a replaced shard builds a new group.
"""

from __future__ import annotations

import itertools
import os
import time

import torch

from raymoe.cluster.transport import DEFAULT_TIMEOUT_S, Sent, ShardFailure, ShardOutput, Transport, is_dead_shard_error
from raymoe.errors import RaymoeError

_group_counter = itertools.count()


class CollectiveUnavailableError(RaymoeError, RuntimeError):
    """The collective backend is missing (NCCL needs cupy: pip install 'raymoe[gpu]')."""


def _collective(backend: str):
    from ray.util import collective

    if not collective.is_backend_available(backend.upper()):
        hint = "install cupy (pip install 'raymoe[gpu]') on a CUDA machine" if backend == "nccl" else "install torch"
        raise CollectiveUnavailableError(f"collective backend {backend!r} is not available here; {hint}")
    return collective


def join_group(world_size: int, rank: int, backend: str, group_name: str) -> None:
    collective = _collective(backend)
    if backend == "gloo" and _gloo_bound():
        raise CollectiveUnavailableError(
            "this process is already in a gloo group (Ray's gloo groups use the process's one "
            "torch.distributed world): gloo allows one group per process; use 'nccl' on GPUs or 'actor_call'"
        )
    collective.init_collective_group(world_size, rank, backend=backend, group_name=group_name)


def _gloo_bound() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def leave_group(group_name: str) -> None:
    from ray.util import collective

    if collective.is_group_initialized(group_name):
        collective.destroy_collective_group(group_name)


def serve_rows(
    core, group_name: str, src_rank: int, layer: int, num_rows: int, expert_ids, counts, dtype: str
) -> float:
    """Shard side of one round trip: recv rows, run them on `core` (an ExpertShardCore), send back."""
    from ray.util import collective

    rows = torch.empty(num_rows, core.spec.hidden_size, dtype=getattr(torch, dtype), device=core.device)
    collective.recv(rows, src_rank, group_name)
    try:
        out = core.run(layer, rows, expert_ids, counts)
    except Exception:
        collective.send(torch.zeros_like(rows), src_rank, group_name)  # the worker waits for this shape
        raise
    collective.send(out.contiguous(), src_rank, group_name)
    return core.last_compute_s


class CollectiveTransport(Transport):
    """Rows by collective send/recv; the metadata (layer, expert ids, counts) by a small actor call."""

    def __init__(self, handles: list, backend: str = "nccl", timeout_s: float = DEFAULT_TIMEOUT_S):
        self.backend, self.timeout_s = backend, timeout_s
        self.handles: list = []
        self.group: str | None = None
        self.set_handles(handles)

    def set_handles(self, handles: list) -> None:
        import ray

        if [id(h) for h in handles] == [id(h) for h in self.handles] and self.group:
            return
        self.close()
        self.handles = list(handles)
        self.group = f"raymoe-experts-{os.getpid()}-{next(_group_counter)}"
        world = len(self.handles) + 1
        joins = [h.join_collective.remote(world, i + 1, self.backend, self.group) for i, h in enumerate(self.handles)]
        join_group(world, 0, self.backend, self.group)  # rendezvous with the shards joining above
        ray.get(joins, timeout=self.timeout_s)

    def send(self, shard_index, layer, rows, expert_ids, counts) -> Sent:
        from ray.util import collective

        rows = rows.contiguous()
        dtype = str(rows.dtype).removeprefix("torch.")
        ref = self.handles[shard_index].run_collective.remote(
            self.group, 0, layer, rows.shape[0], expert_ids, counts, dtype
        )
        collective.send(rows, shard_index + 1, self.group)
        return Sent(shard_index, (ref, torch.empty_like(rows)))

    def wait(self, sent, timeout_s=DEFAULT_TIMEOUT_S):
        import ray
        from ray.util import collective

        replies = []
        for s in sent:
            ref, out = s.ref
            collective.recv(out, s.shard_index + 1, self.group)
            try:
                replies.append(ShardOutput(out, ray.get(ref, timeout=timeout_s)))
            except ray.exceptions.RayError as e:
                replies.append(ShardFailure(s.shard_index, e, is_dead_shard_error(e)))
        return replies

    def close(self) -> None:
        """Leave the group here and on live shards (best effort: a dead shard cannot answer)."""
        import ray

        if self.group is None:
            return
        leaves = [h.leave_collective.remote(self.group) for h in self.handles]
        leave_group(self.group)
        deadline = time.monotonic() + 10.0
        for ref in leaves:
            try:
                ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except ray.exceptions.RayError:
                pass
        self.group = None
