"""Expert-parallel dispatch: an `ExpertBackend` whose routed experts run on expert shards, or in
the caller's own process when they are co-located there.

Per MoE layer: `group_tokens` sorts the T*K (token, expert) pairs by expert (P sorted rows). The
rows of experts the caller co-hosts (`local`: the experts placed on its own node, see
`RemoteExperts`) run in its process with no transport, after the other rows are sent so the two
overlap. Every other expert's rows go to replicas of it (`assign_rows`: a shard on the caller's
node first, then rows balanced across replicas); each shard gets one slice (its rows, grouped by
ascending expert) through a `Transport`; the outputs land back in sorted-row order and `combine`
sums them per token exactly as `LocalExperts` does, so any placement computes the same numbers.
`DispatchCounts` counts where the rows went: in process, to another process, to another node.

Faults: a dead shard's slice is resent to another replica; an expert with no live replica asks
`on_shard_failure(shard) -> (placement, handles)` (the controller re-creates the shard) and retries.
Expert compute is stateless, so a retry is exact.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from raymoe.cluster.colocation import DispatchCounts, LocalHolder, node_experts
from raymoe.cluster.placement import Placement, PlacementError
from raymoe.cluster.transport import (
    DEFAULT_TIMEOUT_S,
    ActorCallTransport,
    ExpertNotHeldError,
    Sent,
    ShardOutput,
    Transport,
)
from raymoe.errors import RaymoeError
from raymoe.model.experts import Done, TokenGroups, combine, group_tokens

Piece = tuple[int, int, int]  # (expert, offset into that expert's rows, rows)
LOCAL = -1  # the shard index of rows run in the caller's own process
ShardFailureCallback = Callable[[int], tuple[Placement, list]]
TIMES = {"dispatch_s": 0.0, "expert_s": 0.0, "local_expert_s": 0.0, "combine_s": 0.0, "calls": 0}


class ShardFailureError(RaymoeError):
    """Experts could not be run: their shards are dead and could not be replaced."""


class NoLiveReplicaError(ShardFailureError):
    def __init__(self, layer: int, expert: int, shards: tuple[int, ...]):
        super().__init__(f"expert {(layer, expert)}: every replica (shards {list(shards)}) is dead")
        self.layer, self.expert, self.shards = layer, expert, shards


def split_rows(loads: list[int], amount: int) -> list[int]:
    """Water-fill `amount` rows onto candidates already carrying `loads` rows: the fullest ends as
    low as possible; leftover single rows go to earlier candidates. -> [n] shares."""
    lo, hi = min(loads), min(loads) + amount
    while lo < hi:  # smallest level the candidates can be filled to
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if sum(max(0, mid - x) for x in loads) >= amount else (mid + 1, hi)
    shares = [max(0, lo - 1 - x) for x in loads]
    rest = amount - sum(shares)
    for i, x in enumerate(loads):
        if rest and x + shares[i] < lo:
            shares[i], rest = shares[i] + 1, rest - 1
    return shares


def assign_rows(
    placement: Placement, layer: int, expert_counts: dict[int, int], local_node: str | None, dead: set[int]
) -> dict[int, list[Piece]]:
    """Rows of each expert -> pieces per shard (ascending expert within a shard). Replicas on
    `local_node` are preferred; among the chosen replicas rows are balanced. Raises
    NoLiveReplicaError when every replica of an expert is in `dead`."""
    loads: dict[int, int] = {}
    out: dict[int, list[Piece]] = {}
    for e, count in sorted(expert_counts.items()):
        if not count:
            continue
        replicas = placement.shards_for(layer, e)
        live = [s for s in replicas if s not in dead]
        if not live:
            raise NoLiveReplicaError(layer, e, replicas)
        chosen = [s for s in live if placement.shard_nodes[s] == local_node] or live
        offset = 0
        for s, n in zip(chosen, split_rows([loads.get(s, 0) for s in chosen], count)):
            if n:
                out.setdefault(s, []).append((e, offset, n))
                loads[s], offset = loads.get(s, 0) + n, offset + n
    return out


@dataclass
class Slice:
    """The rows one shard runs in one round trip."""

    shard: int  # index in the placement it was routed with
    shard_key: object  # identity of the shard actor it went to (indices change with placements)
    index: torch.Tensor  # [n] positions in the sorted rows
    expert_ids: list[int]
    counts: list[int]

    def expert_rows(self) -> dict[int, torch.Tensor]:
        return dict(zip(self.expert_ids, self.index.split(self.counts)))


def actor_key(handle) -> object:
    key = getattr(handle, "_actor_id", None)
    return key if key is not None else id(handle)


class RemoteExperts:
    """ExpertBackend over expert shards. Also counts tokens per (layer, expert), where rows went
    (`counts`) and times each call.

    local: the caller's co-hosted experts. It is kept holding exactly the experts the placement
    puts on the caller's node: new ones load when a placement is handed over (`set_placement`,
    before the worker acks it), dropped ones are freed when the placement switches. Rows of an
    expert it holds never reach the transport."""

    def __init__(
        self,
        placement: Placement,
        handles: list,
        num_layers: int,
        num_experts: int,
        *,
        transport: Transport | None = None,
        node_id: str | None = None,
        on_shard_failure: ShardFailureCallback | None = None,
        max_retries: int = 3,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        local: LocalHolder | None = None,
        num_moe_layers: int | None = None,
    ):
        self.num_experts, self.local = num_experts, local
        self.num_moe_layers = num_moe_layers or num_layers
        self.counts = DispatchCounts()
        self.transport = transport or ActorCallTransport(handles)
        self.node_id = node_id if node_id is not None else _current_node_id()
        self.on_shard_failure = on_shard_failure
        self.max_retries, self.timeout_s = max_retries, timeout_s
        self.dead: set = set()  # actor keys of shards seen dead
        self.load = np.zeros((num_layers, num_experts), dtype=np.int64)  # [layers, experts] pairs routed
        self.times = dict(TIMES)
        self._lock = threading.Lock()
        self._next: tuple[Placement, list] | None = None
        self.placement, self.handles = placement, []
        self._load_local(placement)
        self._use(placement, handles)

    @property
    def epoch(self) -> int:
        return self.placement.epoch

    def set_placement(self, placement: Placement, handles: list) -> None:
        """Switch to `placement` at the next call (call it at a step boundary)."""
        if len(handles) != placement.num_shards:
            raise PlacementError(f"{len(handles)} shard handles for a placement of {placement.num_shards} shards")
        self._load_local(placement)
        with self._lock:
            self._next = (placement, list(handles))

    def run(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x: [T, H], topk_ids/topk_weights: [T, K] -> [T, H]."""
        return self.run_async(layer, x, topk_ids, topk_weights).result()

    def run_async(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """Send the layer's rows to the shards now; `.result()` gathers and combines them."""
        start = time.perf_counter()
        groups = group_tokens(topk_ids, topk_weights, self.num_experts)
        self.load[layer] += np.asarray(groups.counts, dtype=np.int64)
        self.counts.pairs += topk_ids.numel()
        self.counts.token_layers += x.shape[0]
        rows = x[groups.token_of_row]  # [P, H] sorted by expert
        self._switch()
        if self._all_local(layer, groups.counts):  # no slices to route: run them here, as they are
            return self._run_local(layer, rows, groups, x.shape[0], start)
        expert_rows = {e: torch.arange(a, b) for e, a, b in groups.expert_ranges()}
        local_before = self.times["local_expert_s"]
        inflight = self._send(layer, rows, expert_rows)
        pending = PendingExperts(self, layer, rows, groups, x.shape[0], inflight, time.perf_counter() - start)
        pending.local_before = local_before
        return pending

    def _all_local(self, layer: int, counts: list[int]) -> bool:
        return self.local is not None and all(self.local.holds(layer, e) for e, c in enumerate(counts) if c)

    def _run_local(self, layer: int, rows: torch.Tensor, groups: TokenGroups, num_tokens: int, start: float):
        ids = [e for e, c in enumerate(groups.counts) if c]
        compute = time.perf_counter()
        out = self.local.run(layer, rows, ids, [groups.counts[e] for e in ids])
        self.times["local_expert_s"] += time.perf_counter() - compute
        self.counts.rows_local += rows.shape[0]
        mid = time.perf_counter()
        done = Done(combine(out, groups, num_tokens))
        self._record(compute - start, 0.0, time.perf_counter() - mid)  # dispatch: grouping the rows
        return done

    def take_load(self) -> np.ndarray:
        """[layers, experts] token-expert pairs routed since the last take (rows: model layer ids)."""
        load, self.load = self.load, np.zeros_like(self.load)
        return load

    def take_timings(self) -> dict:
        """Seconds spent in dispatch (send + wait minus shard compute), expert compute (the slowest
        shard of each round trip), co-located expert compute (in this process), combine; and the
        number of calls; since the last take."""
        times, self.times = self.times, dict(TIMES)
        return times

    def count_summary(self) -> dict:
        """`DispatchCounts.summary` since this backend started, with this process's node."""
        return {"node_id": self.node_id, **self.counts.summary(self.num_moe_layers)}

    def _use(self, placement: Placement, handles: list) -> None:
        if len(handles) != placement.num_shards:
            raise PlacementError(f"{len(handles)} shard handles for a placement of {placement.num_shards} shards")
        self.placement, self.handles = placement, list(handles)
        self.transport.set_handles(self.handles)
        if self.local is not None:
            self.local.free(set(self.local.held()) - node_experts(placement, self.node_id))

    def _load_local(self, placement: Placement) -> None:
        if self.local is not None:
            self.local.load(sorted(node_experts(placement, self.node_id) - set(self.local.held())))

    def _switch(self) -> None:
        with self._lock:
            pending, self._next = self._next, None
        if pending is not None and pending[0].epoch >= self.placement.epoch:  # never back to an older one
            self._use(*pending)

    def _send(self, layer: int, rows: torch.Tensor, expert_rows: dict[int, torch.Tensor]) -> list:
        """Send the remote slices, then run the local one here: -> [(Slice, Sent | ShardOutput)]."""
        slices = self._route(layer, expert_rows)
        sent: list = []
        for s in slices:
            if s.shard != LOCAL:
                sent.append((s, self.transport.send(s.shard, layer, rows[s.index], s.expert_ids, s.counts)))
                self.counts.rows_process += len(s.index)
                self.counts.rows_node += len(s.index) * (self.placement.shard_nodes[s.shard] != self.node_id)
        for s in slices:
            if s.shard == LOCAL:
                start = time.perf_counter()
                mine = rows if len(s.index) == rows.shape[0] else rows[s.index]  # all rows: in order already
                out = self.local.run(layer, mine, s.expert_ids, s.counts)
                sent.append((s, ShardOutput(out, 0.0)))
                self.counts.rows_local += len(s.index)
                self.times["local_expert_s"] += time.perf_counter() - start
        return sent

    def _route(self, layer: int, expert_rows: dict[int, torch.Tensor]) -> list[Slice]:
        counts = {e: len(ix) for e, ix in expert_rows.items()}
        for _ in range(self.max_retries + 1):
            self._switch()
            here = {e: n for e, n in counts.items() if self.local is not None and self.local.holds(layer, e)}
            elsewhere = {e: n for e, n in counts.items() if e not in here}
            dead = {s for s, h in enumerate(self.handles) if actor_key(h) in self.dead}
            try:
                assignment = assign_rows(self.placement, layer, elsewhere, self.node_id, dead)
                if here:
                    assignment[LOCAL] = [(e, 0, n) for e, n in sorted(here.items())]
                break
            except NoLiveReplicaError as e:
                self._replace(e)
        else:
            raise ShardFailureError(f"layer {layer}: no live shard after {self.max_retries} re-creations")
        return [self._slice(shard, pieces, expert_rows) for shard, pieces in sorted(assignment.items())]

    def _slice(self, shard: int, pieces: list[Piece], expert_rows: dict[int, torch.Tensor]) -> Slice:
        index = torch.cat([expert_rows[e][offset : offset + n] for e, offset, n in pieces])
        ids, counts = [e for e, _, _ in pieces], [n for _, _, n in pieces]
        return Slice(shard, None if shard == LOCAL else actor_key(self.handles[shard]), index, ids, counts)

    def _replace(self, error: NoLiveReplicaError) -> None:
        if self.on_shard_failure is None:
            raise ShardFailureError(f"{error}; no on_shard_failure callback to re-create shards") from error
        for shard in error.shards:
            self._use(*self.on_shard_failure(shard))

    def _failed(self, slice_: Slice, error: BaseException, is_dead: bool) -> None:
        if is_dead:
            self.dead.add(slice_.shard_key)
        elif not isinstance(error, ExpertNotHeldError):
            raise error  # a bug, not a fault: retrying elsewhere would hide it

    def _record(self, dispatch_s: float, expert_s: float, combine_s: float) -> None:
        t = self.times
        t["dispatch_s"] += max(0.0, dispatch_s)
        t["expert_s"] += expert_s
        t["combine_s"] += combine_s
        t["calls"] += 1


class PendingExperts:
    """One layer's expert round trip in flight; `result()` -> [T, H]."""

    def __init__(self, owner: RemoteExperts, layer: int, rows, groups: TokenGroups, num_tokens: int, inflight, send_s):
        self.owner, self.layer, self.rows, self.groups = owner, layer, rows, groups
        self.num_tokens, self.inflight, self.send_s = num_tokens, inflight, send_s
        self.local_before = owner.times["local_expert_s"]  # to tell this call's local compute from its wait
        self._out: torch.Tensor | None = None

    def result(self) -> torch.Tensor:
        if self._out is None:
            start = time.perf_counter()
            rows_out, compute_s = self._gather()
            mid = time.perf_counter()
            self._out = combine(rows_out, self.groups, self.num_tokens)
            local_s = self.owner.times["local_expert_s"] - self.local_before  # in send, or in a resend
            wait_s = mid - start + self.send_s - local_s
            self.owner._record(wait_s - compute_s, compute_s, time.perf_counter() - mid)
        return self._out

    def _gather(self) -> tuple[torch.Tensor, float]:
        """Wait for every slice, resending failed ones; -> rows_out [P, H], shard compute seconds."""
        owner, out, compute_s = self.owner, torch.empty_like(self.rows), 0.0
        if len(self.inflight) == 1 and isinstance(self.inflight[0][1], ShardOutput):
            slice_, done = self.inflight[0]
            if len(slice_.index) == len(self.rows):  # every row ran in this process
                return done.rows, 0.0
        for attempt in range(owner.max_retries + 1):
            done = [(s, r) for s, r in self.inflight if isinstance(r, ShardOutput)]  # run in this process
            remote = [(s, r) for s, r in self.inflight if not isinstance(r, ShardOutput)]
            slices, sent = [s for s, _ in remote], [r for _, r in remote]
            replies = owner.transport.wait(list(sent), owner.timeout_s) if sent else []
            for s, r in done:
                out[s.index] = r.rows
            failed = []
            for s, reply in zip(slices, replies):
                if isinstance(reply, ShardOutput):
                    out[s.index] = reply.rows
                else:
                    owner._failed(s, reply.error, reply.is_dead)
                    failed.append((s, reply.error))
            compute_s += max((r.compute_s for r in replies if isinstance(r, ShardOutput)), default=0.0)
            if not failed:
                return out, compute_s
            if attempt < owner.max_retries:
                self.inflight = owner._send(self.layer, self.rows, _merge_rows([s for s, _ in failed]))
        raise ShardFailureError(
            f"layer {self.layer}: expert slices still failing after {owner.max_retries} retries "
            f"(last: {failed[-1][1]!r})"
        ) from failed[-1][1]


def _merge_rows(slices: list[Slice]) -> dict[int, torch.Tensor]:
    """expert -> its rows over several slices (an expert split across replicas comes back whole)."""
    parts: dict[int, list[torch.Tensor]] = {}
    for s in slices:
        for e, ix in s.expert_rows().items():
            parts.setdefault(e, []).append(ix)
    return {e: torch.cat(ixs) for e, ixs in parts.items()}


def _current_node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
