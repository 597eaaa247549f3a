"""Routed expert FFNs, computed grouped: tokens sorted by expert, every expert of a layer at once.

The work of one MoE layer splits in three so that the middle can run in another process:
  1. `group_tokens`: sort the T*K (token, expert) pairs by expert -> `TokenGroups`;
  2. `ExpertStore.run_groups`: run each expert on its contiguous group of rows (on CPU, the small
     groups of a decode step in one call of raymoe's C kernel, `raymoe.model.native.experts`; the
     others in two `torch._grouped_mm` calls; where that is missing, a batched or per-expert fallback);
  3. `combine`: weight each row by its router weight and sum back per token.
The sum in (3) adds a token's expert outputs in ascending expert order, as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from raymoe.model.grouped import can_group
from raymoe.model.native import experts as native
from raymoe.model.matmul import bucket, matmul, native_low, pad_pays, widen

from raymoe.logs import progress
from raymoe.model.checkpoint import Checkpoint
from raymoe.model.host import ints
from raymoe.model.layers import SwiGLU
from raymoe.model.spec import ModelSpec


@dataclass
class TokenGroups:
    """(token, expert) pairs of one layer sorted by expert. P = T * K pairs."""

    token_of_row: torch.Tensor  # [P] source token of each sorted row
    weight_of_row: torch.Tensor  # [P] router weight of each sorted row
    counts: list[int]  # [E] rows per expert, in expert order

    def expert_ranges(self) -> Iterable[tuple[int, int, int]]:
        """(expert, start, end) of every non-empty group."""
        start = 0
        for expert, count in enumerate(self.counts):
            if count:
                yield expert, start, start + count
            start += count


def group_tokens(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> TokenGroups:
    """topk_ids, topk_weights: [T, K] -> rows sorted by expert (stable: token order within an expert)."""
    top_k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return TokenGroups(order // top_k, topk_weights.reshape(-1)[order], counts)


def combine(rows_out: torch.Tensor, groups: TokenGroups, num_tokens: int) -> torch.Tensor:
    """rows_out [P, H] (sorted rows' expert outputs) -> [T, H] router-weighted sums per token."""
    weighted = rows_out * groups.weight_of_row[:, None].to(rows_out.dtype)
    out = rows_out.new_zeros(num_tokens, rows_out.shape[1])
    return out.index_add_(0, groups.token_of_row, weighted)


def expert_prefix(spec: ModelSpec, layer: int, expert: int) -> tuple[str, tuple[str, str, str]]:
    """Checkpoint name prefix of one expert and its (gate, up, down) weight names."""
    if spec.family == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}", ("w1", "w3", "w2")
    return f"model.layers.{layer}.mlp.experts.{expert}", ("gate_proj", "up_proj", "down_proj")


class LayerExperts:
    """The experts one process holds of one layer, stacked for batched matmuls.

    gate_up_t: [n, H, 2I] and down_t: [n, I, H] (transposed, so rows @ weight needs no copy).
    strips: for small float32 experts, the same packed by strips for raymoe's C kernels
    (`native.experts.pack`), else None.
    """

    def __init__(self, expert_ids: list[int], gate_up_t: torch.Tensor, down_t: torch.Tensor):
        self.expert_ids = expert_ids
        self.local = {e: j for j, e in enumerate(expert_ids)}  # logical expert -> index in the stack
        self.gate_up_t, self.down_t = gate_up_t, down_t
        self.strips = native.pack(gate_up_t, down_t)

    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(gate_up, down, packed by strips?) as raymoe's C kernels take them: the strips where kept."""
        return (*self.strips, True) if self.strips is not None else (self.gate_up_t, self.down_t, False)

    @classmethod
    def stack(cls, experts: dict[int, SwiGLU]) -> "LayerExperts":
        ids = sorted(experts)
        gate_up = torch.stack([experts[e].gate_up.t() for e in ids]).contiguous()
        down = torch.stack([experts[e].down.t() for e in ids]).contiguous()
        return cls(ids, gate_up, down)

    def run_one(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x: [N, H] -> [N, H]."""
        j = self.local[expert]
        gate_up, down, strips = self.kernel_weights()
        fn = native.kernel_for(x, gate_up, down, strips) if self._native_takes(x.shape[0]) else None
        if fn is not None:  # raymoe's kernel, as in `ExpertStore.run_groups`
            out = torch.empty_like(x)
            native.run(fn, x, [x.shape[0]], gate_up[j : j + 1], down[j : j + 1], out)
            return out
        gate, up = matmul(x, self.gate_up_t[j]).chunk(2, dim=-1)
        return matmul(F.silu(gate) * up, self.down_t[j])

    def _native_takes(self, largest: int) -> bool:
        """Whether raymoe's kernel runs groups of up to `largest` rows of these experts."""
        return native.takes(largest, self.gate_up_t.shape[1], self.down_t.shape[1])

    def run_grouped(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """rows [P, H] in contiguous groups, counts[j] rows for held expert j (stack order) -> [P, H].
        Two grouped matmuls for the whole layer; each group's rows get the same `mm` as `run_one`."""
        offs = ints(counts, torch.int32).cumsum(0, dtype=torch.int32)  # [n] group ends
        gate, up = torch._grouped_mm(rows, self.gate_up_t, offs=offs).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, self.down_t, offs=offs)

    def run_padded(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """rows [P, H] in contiguous groups, counts[j] rows for held expert j (stack order, zeros
        allowed) -> [P, H]. Two batched matmuls over every held expert, each group padded to the
        largest: few ops instead of a chain per expert; pays off while groups are small (decode)."""
        n, sizes, cap = len(counts), np.array(counts), max(counts)
        cap = bucket(cap) if native_low(rows) else cap  # bf16 on a bf16 CPU: few shapes, one oneDNN kernel each
        group_of_row = np.repeat(np.arange(n), sizes)
        dest = group_of_row * cap + np.arange(rows.shape[0]) - (sizes.cumsum() - sizes)[group_of_row]  # [P]
        dest = torch.from_numpy(dest).to(rows.device)  # built on the host from the counts, moved once
        padded = rows.new_zeros(n * cap, rows.shape[1]).index_copy_(0, dest, rows)
        gate, up = torch.bmm(padded.view(n, cap, -1), self.gate_up_t).chunk(2, dim=-1)
        out = torch.bmm(F.silu(gate) * up, self.down_t)  # [n, cap, H]
        return out.view(-1, out.shape[-1])[dest]


class ExpertStore:
    """The physical experts one process holds: layer -> LayerExperts."""

    def __init__(self, layers: dict[int, LayerExperts]):
        self.layers = layers

    @classmethod
    def load(
        cls, ckpt: Checkpoint, spec: ModelSpec, dtype: torch.dtype, which: Iterable[tuple[int, int]] | None = None
    ) -> "ExpertStore":
        """Load `which` (layer, expert) pairs, or every routed expert; reads only their tensors."""
        if which is None:
            which = [(layer, e) for layer in spec.moe_layer_ids for e in range(spec.num_experts)]
        by_layer: dict[int, dict[int, SwiGLU]] = {}
        which = list(which)
        for layer, e in progress(which, f"loading experts of {ckpt.path.name}", unit="expert"):
            prefix, names = expert_prefix(spec, layer, e)
            by_layer.setdefault(layer, {})[e] = SwiGLU.load(ckpt, prefix, dtype, names)
        return cls({layer: LayerExperts.stack(experts) for layer, experts in by_layer.items()})

    @property
    def experts(self) -> list[tuple[int, int]]:
        return [(layer, e) for layer, le in self.layers.items() for e in le.expert_ids]

    def holds(self, layer: int, expert: int) -> bool:
        return layer in self.layers and expert in self.layers[layer].local

    def run_group(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x: [N, H] rows routed to this expert -> [N, H]."""
        return self.layers[layer].run_one(expert, x)

    def run_groups(self, layer: int, rows: torch.Tensor, groups: TokenGroups) -> torch.Tensor:
        """rows: [P, H] sorted by expert -> [P, H] expert outputs (every row's expert is held).

        All in one call of raymoe's C kernel where it is built and takes the groups
        (`native.experts.takes`: decode-sized groups always, larger ones while the expert widths
        keep its weight panels in cache; `bench/kernel_costs.py`). Else: in low precision on a CPU with bf16
        instructions (`raymoe.model.matmul`): two batched matmuls over every held expert padded to
        the largest group where that pays (`pad_pays`: 1.2-2x
        faster than grouped at 8-256 tokens), else the chain per expert (each matmul in float32
        while its rows are few): torch's grouped call makes the same bf16 calls. Else two grouped
        matmuls where `torch._grouped_mm` runs (`can_group`). Else two batched matmuls over every
        held expert when each has rows and padding at most quadruples them (decode batches); else
        one matmul chain per expert, reading only the experts used (and, in bfloat16 on a CPU
        without bf16 instructions, widening only those)."""
        present = [c for c in groups.counts if c]
        if not present:
            return torch.empty_like(rows)
        held = self.layers[layer]
        counts = [groups.counts[e] for e in held.expert_ids]
        assert sum(counts) == rows.shape[0], "a row's expert is not held here"
        gate_up, down, strips = held.kernel_weights()
        fn = native.kernel_for(rows, gate_up, down, strips) if held._native_takes(max(present)) else None
        if fn is None:
            return self._run_torch(held, rows, groups, counts, present)
        out = torch.empty_like(rows)
        native.run(fn, rows, counts, gate_up, down, out)
        return out

    @staticmethod
    def _run_torch(held: LayerExperts, rows: torch.Tensor, groups: TokenGroups, counts: list[int],
                   present: list[int]) -> torch.Tensor:
        """Every group through torch's matmuls (the choices of `run_groups`' docstring)."""
        if native_low(rows):  # bf16 on a bf16 CPU: the calls are what costs
            if pad_pays(rows, counts):
                return held.run_padded(rows, counts)
        elif can_group(rows, held.gate_up_t, held.down_t):
            return held.run_grouped(rows, counts)
        elif len(present) == len(held.expert_ids) and max(present) * len(present) <= 4 * rows.shape[0]:
            if not widen(rows):
                return held.run_padded(rows, counts)
        out = torch.empty_like(rows)
        for expert, start, end in groups.expert_ranges():
            out[start:end] = held.run_one(expert, rows[start:end])
        return out

    def nbytes(self) -> int:
        return sum(le.gate_up_t.nbytes + le.down_t.nbytes for le in self.layers.values())


class ExpertBackend(Protocol):
    """Where routed experts run: in this process, or on expert shards (raymoe.cluster)."""

    def run(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x: [T, H], topk_ids/topk_weights: [T, K] -> [T, H] weighted sum of the routed experts."""
        ...


class LocalExperts:
    """ExpertBackend running every expert in this process."""

    def __init__(self, store: ExpertStore, num_experts: int):
        self.store, self.num_experts = store, num_experts

    def whole(self, layer: int) -> LayerExperts | None:
        """The layer's stacked experts where this process holds all of them (in id order), else None."""
        held = self.store.layers.get(layer)
        return held if held is not None and len(held.expert_ids) == self.num_experts else None

    def run(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        held = self.store.layers[layer]
        if topk_ids.dtype == torch.long and self.whole(layer) is not None:
            fused = native.run_layer(x, topk_ids, topk_weights, *held.kernel_weights())
            if fused is not None:  # raymoe's kernel: the same bits as the three steps below
                return fused
        groups = group_tokens(topk_ids, topk_weights, self.num_experts)
        rows_out = self.store.run_groups(layer, x[groups.token_of_row], groups)
        return combine(rows_out, groups, x.shape[0])

    def run_async(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Done:
        return Done(self.run(layer, x, topk_ids, topk_weights))


class Done:
    """An already computed result, for backends without a real asynchronous path."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def result(self) -> torch.Tensor:
        return self.value
