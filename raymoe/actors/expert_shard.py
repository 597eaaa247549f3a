"""Expert shard: holds some physical experts (any layers) and runs grouped expert FFNs for the rows
it is sent.

`ExpertShardCore` is the plain class (tests build it without Ray); `ExpertShard` is the thin Ray
actor over it, and a worker's co-located experts are one too (`raymoe.cluster.dispatch`). A holder
reads from the checkpoint only the tensors of the experts it holds, once per node: on CPU its
weights are views into the node's shared expert files (`raymoe.model.expert_file`), so a shard and
a worker on one node holding the same experts share one copy. Placement changes come as `load`
(phase 1: add the new replicas) and `free` (after the old epoch drained).
"""

from __future__ import annotations

import time
from typing import Iterable

import ray
import torch

from raymoe.cluster.transport import ExpertNotHeldError, from_wire, split_like
from raymoe.engine.device import resolve_device, resolve_dtype
from raymoe.errors import ConfigError
from raymoe.logs import configure_actor, progress
from raymoe.model.checkpoint import Checkpoint
from raymoe.model.expert_file import LayerFile, open_layer_file
from raymoe.model.experts import ExpertStore, LayerExperts, TokenGroups, expert_prefix
from raymoe.model.layers import SwiGLU
from raymoe.model.spec import load_spec

ExpertKey = tuple[int, int]  # (layer, logical expert)


def run_expert_groups(
    store: ExpertStore, num_experts: int, layer: int, rows: torch.Tensor, expert_ids: list[int], counts: list[int]
) -> torch.Tensor:
    """rows [N, H], sorted into contiguous groups (`expert_ids[i]` has `counts[i]` rows) -> [N, H].

    Ascending expert ids take `ExpertStore.run_groups` (batched when every held expert has rows);
    any other order runs one matmul chain per group."""
    pairs = [(e, c) for e, c in zip(expert_ids, counts) if c]
    ids = [e for e, _ in pairs]
    if ids == sorted(set(ids)):
        full = [0] * num_experts
        for e, c in pairs:
            full[e] = c
        empty = rows.new_empty(0, dtype=torch.long)
        return store.run_groups(layer, rows, TokenGroups(empty, empty, full))
    out, start = torch.empty_like(rows), 0
    for e, c in pairs:
        out[start : start + c] = store.run_group(layer, e, rows[start : start + c])
        start += c
    return out


class ExpertShardCore:
    """The experts one holder keeps, loadable and freeable one (layer, expert) at a time."""

    def __init__(self, model_path: str, experts: Iterable[ExpertKey], dtype: str = "float32", device: str = "cpu"):
        self.model_path = model_path
        self.spec = load_spec(model_path)
        self.ckpt = Checkpoint(model_path)
        self.device = torch.device(resolve_device(device))  # auto: CUDA when this process sees one
        self.dtype = _torch_dtype(resolve_dtype(dtype, self.device.type))
        self.experts: set[ExpertKey] = set()  # the held experts
        self.files: dict[int, LayerFile] = {}  # layer -> the node's shared file of its experts
        self.store = ExpertStore({})
        self.last_compute_s = 0.0  # wall time of the last `run`, for the step breakdown
        self.rows_served = 0
        self.first_served_at: float | None = None  # wall clock of the first `run` (elasticity timing)
        self.load(experts)

    def load(self, experts: Iterable[ExpertKey]) -> None:
        """Add experts (already held ones are skipped): reads only their tensors, and only if no
        process on this node has yet."""
        new = sorted({self._check(key) for key in experts} - self.experts)
        for layer, e in progress(new, "expert shard: loading experts", unit="expert"):
            self._file(layer).fill([e], lambda e: self._read(layer, e))
        self.experts.update(new)
        self._restack({layer for layer, _ in new})

    def free(self, experts: Iterable[ExpertKey]) -> None:
        """Drop experts (ones not held are ignored); the node's file keeps them for other holders."""
        gone = {tuple(key) for key in experts} & self.experts
        self.experts -= gone
        self._restack({layer for layer, _ in gone})

    def held(self) -> list[ExpertKey]:
        return sorted(self.experts)

    def holds(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.experts

    def nbytes(self) -> int:
        """Bytes of the held experts' weights (mapped from the node's files on CPU, not private)."""
        s = self.spec
        return len(self.experts) * 3 * s.hidden_size * s.moe_intermediate_size * self.dtype.itemsize

    def run(self, layer: int, rows: torch.Tensor, expert_ids: list[int], counts: list[int]) -> torch.Tensor:
        """rows [N, H] in contiguous groups (`expert_ids` order, `counts` rows each) -> outputs [N, H]."""
        start = time.perf_counter()
        missing = [e for e in expert_ids if not self.holds(layer, e)]
        if missing:
            raise ExpertNotHeldError(f"layer {layer}: experts {missing} are not held here (stale placement)")
        if sum(counts) != rows.shape[0]:
            raise ValueError(f"counts {counts} sum to {sum(counts)}, but {rows.shape[0]} rows came")
        x = rows.to(self.device, self.dtype)
        out = run_expert_groups(self.store, self.spec.num_experts, layer, x, expert_ids, counts)
        self.last_compute_s = time.perf_counter() - start
        self.rows_served += rows.shape[0]
        if self.first_served_at is None:
            self.first_served_at = time.time()
        return out.to(rows.device, rows.dtype)

    def stats(self) -> dict:
        return {"experts": len(self.experts), "rows_served": self.rows_served, "first_served_at": self.first_served_at}

    def _check(self, key) -> ExpertKey:
        layer, e = int(key[0]), int(key[1])
        if layer not in self.spec.moe_layer_ids or not 0 <= e < self.spec.num_experts:
            raise ConfigError(
                f"expert {(layer, e)} does not exist: MoE layers are {self.spec.moe_layer_ids}, "
                f"experts 0..{self.spec.num_experts - 1}"
            )
        return layer, e

    def _file(self, layer: int) -> LayerFile:
        if layer not in self.files:
            s = self.spec
            self.files[layer] = open_layer_file(self.model_path, layer, s.num_experts, s.hidden_size,
                                                s.moe_intermediate_size, self.dtype)  # fmt: skip
        return self.files[layer]

    def _read(self, layer: int, expert: int) -> SwiGLU:
        prefix, names = expert_prefix(self.spec, layer, expert)
        return SwiGLU.load(self.ckpt, prefix, self.dtype, names)

    def _restack(self, layers: set[int]) -> None:
        """Each layer's held experts as one `LayerExperts` over the contiguous span [lo, hi] of the
        file that covers them: views, no copy on CPU (rows only ever go to held experts)."""
        for layer in layers:
            ids = sorted(e for lay, e in self.experts if lay == layer)
            if not ids:
                self.store.layers.pop(layer, None)
                continue
            f, lo, hi = self.files[layer], ids[0], ids[-1] + 1
            gate_up, down = f.gate_up_t[lo:hi], f.down_t[lo:hi]
            if self.device.type != "cpu":  # on a device the holder keeps its own copy
                gate_up, down = gate_up.to(self.device), down.to(self.device)
            self.store.layers[layer] = LayerExperts(list(range(lo, hi)), gate_up, down)


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"dtype {name!r} is not a torch dtype; use float32, bfloat16 or float16")
    return dtype


@ray.remote(num_cpus=0)
class ExpertShard:
    """Ray actor over `ExpertShardCore`. `run` returns (outputs, compute seconds)."""

    def __init__(self, model_path: str, experts: list[ExpertKey], dtype: str = "float32", device: str = "cpu"):
        torch.set_num_threads(1)  # shards share the node's cores with workers and other shards
        configure_actor()
        self.core = ExpertShardCore(model_path, experts, dtype, device)

    def ping(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def load(self, experts: list[ExpertKey]) -> int:
        self.core.load(experts)
        return len(self.core.experts)

    def free(self, experts: list[ExpertKey]) -> int:
        self.core.free(experts)
        return len(self.core.experts)

    def held(self) -> list[ExpertKey]:
        return self.core.held()

    def stats(self) -> dict:
        """Experts held, rows served, wall clock of the first served row (None: never served)."""
        return {"node_id": self.ping(), **self.core.stats()}

    def run(self, layer: int, rows: torch.Tensor, expert_ids: list[int], counts: list[int]):
        out = self.core.run(layer, rows, expert_ids, counts)
        return out, self.core.last_compute_s

    def run_wire(self, layer: int, expert_ids: list[int], counts: list[int], dtype: str, *chunks):
        """`run` for `ActorCallTransport`: rows as uint8 chunks in, outputs as chunks of the same
        row counts out, then the compute seconds (the caller sets num_returns = chunks + 1)."""
        out = self.core.run(layer, from_wire(dtype, list(chunks)), expert_ids, counts)
        return (*split_like(out, [len(c) for c in chunks]), self.core.last_compute_s)

    def join_collective(self, world_size: int, rank: int, backend: str, group_name: str) -> None:
        from raymoe.cluster.transport_nccl import join_group

        join_group(world_size, rank, backend, group_name)

    def leave_collective(self, group_name: str) -> None:
        from raymoe.cluster.transport_nccl import leave_group

        leave_group(group_name)

    def run_collective(self, group_name: str, src_rank: int, layer: int, num_rows: int, expert_ids, counts, dtype):
        """Receive rows from `src_rank` over the collective group, run them, send the outputs back."""
        from raymoe.cluster.transport_nccl import serve_rows

        return serve_rows(self.core, group_name, src_rank, layer, num_rows, expert_ids, counts, dtype)
