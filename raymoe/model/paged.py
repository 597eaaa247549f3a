"""Paged KV cache tensors and batched attention over them.

The KV of every sequence lives in fixed-size blocks of a per-layer pool:
`k_cache [num_blocks, block_size, kv_heads, k_dim]`, `v_cache [num_blocks, block_size, kv_heads, v_dim]`.
A sequence's block table lists its blocks in order; token `i` of a sequence sits in slot
`block_table[i // block_size] * block_size + i % block_size` of the flattened pool.

One engine step runs B sequences with `query_lens[b]` new tokens each (a decode: 1; a prefill chunk:
many), flattened to T tokens. `AttentionBatch` carries everything the attention layers need for
that step, built once per step and shared by every layer.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k_cache, v_cache)
TENSOR_FIELDS = ("positions", "slot_mapping", "block_tables", "query_index", "token_index", "sequence_tags",
                 "tree_mask")


def allocate_kv_cache(
    kv_layout: list[tuple[int, int, int]], num_blocks: int, block_size: int, dtype: torch.dtype,
    device: str | torch.device = "cpu",
) -> KVCache:
    """kv_layout: per layer (kv_heads, k_dim, v_dim) -> zeroed paged cache tensors on `device`."""
    return [
        (
            torch.zeros(num_blocks, block_size, heads, k_dim, dtype=dtype, device=device),
            torch.zeros(num_blocks, block_size, heads, v_dim, dtype=dtype, device=device),
        )
        for heads, k_dim, v_dim in kv_layout
    ]


def kv_bytes_per_block(kv_layout: list[tuple[int, int, int]], block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return sum(block_size * heads * (k + v) * elem for heads, k, v in kv_layout)


@dataclass
class AttentionBatch:
    """Metadata of one forward step over B sequences, T new tokens in total."""

    query_lens: list[int]  # [B] new tokens per sequence this step
    context_lens: list[int]  # [B] tokens in the KV after this step (cached + new)
    positions: torch.Tensor  # [T] absolute position of each new token
    slot_mapping: torch.Tensor  # [T] flat pool slot where each new token's KV is written
    block_tables: torch.Tensor  # [B, max_blocks] each sequence's context blocks (padded: block 0)
    query_index: torch.Tensor  # [B, max_q] index into the T tokens (padded: T, a zero row)
    token_index: torch.Tensor  # [T] position of each token in the flattened [B * max_q] layout
    block_size: int
    explicit_positions: bool = False  # new tokens at given positions, not the last of each context
    sequence_tags: torch.Tensor | None = None  # [T] each token's sequence tag (routing replay's key)
    trees: list | None = None  # [B] per sequence None, or its new tokens' parents (a draft tree, see below)
    tree_mask: torch.Tensor | None = None  # [B, max_q, max_q] new token i may see new token j (trees only)
    _masks: dict = field(default_factory=dict)  # (sliding window (None = full), GQA group) -> mask
    _plan: object = None  # the unpadded attention's plan (`raymoe.model.ragged`), built on first use

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def is_decode_only(self) -> bool:
        return self.query_index.shape[1] == 1  # max_q == 1: every sequence decodes one token

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        positions: list[list[int]] | None = None,
        tags: list[int] | None = None,
        device: str | torch.device = "cpu",
        trees: list[list[int] | None] | None = None,
    ) -> "AttentionBatch":
        """Everything is derived from per-sequence lengths and block tables (vectorised: built every step).

        positions: per sequence, the increasing positions (< its context length) of its new tokens
        when they are not its last `query_lens[b]` tokens (chunk-cache repair recomputes a chosen
        subset); the mask is then causal by position (a query sees keys at or before its own).
        tags: per sequence, its tag (the first token id of its prompt), for routing replay.
        device: where the tensors go (built on the host, then moved in one go).
        trees: per sequence None, or the parent of each of its new tokens (index among them, -1 for
        the first, which is the root): a draft tree being verified (speculative decoding). Its
        tokens take the sequence's next slots in the given order but sit at position
        `root's position + depth`, and each sees the context before the root and its own ancestors
        only (tree attention)."""
        assert len(query_lens) == len(context_lens) == len(block_tables)
        max_q, max_ctx = max(query_lens), max(context_lens)
        max_blocks = (max_ctx + block_size - 1) // block_size
        tables = _padded(block_tables, max_blocks)
        q_lens = np.array(query_lens, np.int64)  # [B]; the layout is computed in numpy (a few us an op, not torch's ~5)
        decodes_only = max_q == 1 == min(query_lens)
        if decodes_only:  # token b is sequence b's
            firsts = rows = np.arange(len(query_lens))
            within = np.zeros_like(rows)
        else:
            firsts = np.cumsum(q_lens) - q_lens  # [B] flat index of each sequence's first new token
            rows = np.repeat(np.arange(len(query_lens)), q_lens)  # [T] sequence of each token
            within = np.arange(rows.shape[0]) - firsts[rows]  # [T] index of a token within its sequence
        explicit = positions is not None
        if positions is None:  # [T] its position: the last query_lens[b] of its context
            cols = (np.array(context_lens, np.int64) - q_lens)[rows] + within
        else:
            assert [len(p) for p in positions] == list(query_lens), "one position per new token"
            cols = np.array([p for ps in positions for p in ps], np.int64)
        if decodes_only:
            query_index = firsts[:, None]  # [B, 1]
        else:
            j = np.arange(max_q)
            query_index = np.where(j[None, :] < q_lens[:, None], firsts[:, None] + j, rows.shape[0])  # [B, max_q]
        slot_mapping = tables[rows, cols // block_size] * block_size + cols % block_size
        tree_mask, slots = None, torch.from_numpy(cols)
        positions = slots
        if trees is not None and any(t is not None for t in trees):
            assert not explicit, "a draft tree takes the next slots"
            shift, tree_mask = tree_layout(query_lens, trees)
            positions = slots + shift
        batch = cls(
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            positions=positions,
            slot_mapping=torch.from_numpy(slot_mapping),
            block_tables=torch.from_numpy(tables),
            query_index=torch.from_numpy(query_index),
            token_index=torch.from_numpy(rows * max_q + within),
            block_size=block_size,
            explicit_positions=explicit,
            sequence_tags=None if tags is None else torch.from_numpy(np.array(tags, np.int64)[rows]),
            trees=None if tree_mask is None else list(trees),
            tree_mask=tree_mask,
        )
        return batch if torch.device(device).type == "cpu" else batch.to(device)

    def to(self, device: str | torch.device) -> "AttentionBatch":
        """The same batch with its tensors on `device` (masks are rebuilt there)."""
        move = {f: getattr(self, f).to(device) for f in TENSOR_FIELDS if getattr(self, f) is not None}
        return dataclasses.replace(self, **move, _masks={}, _plan=None)

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def mask(self, sliding_window: int | None = None, group: int = 1) -> torch.Tensor:
        """[B, 1, group * max_q, max_blocks * block_size] bool, True where a query may attend to a key
        (causal, in window); each query row repeated for the `group` query heads folded into it (GQA).
        Built once per step and shared by every layer."""
        key = (sliding_window, group)
        if key not in self._masks:
            mask = self._build_mask(sliding_window)  # [B, 1, max_q, max_ctx]
            if group > 1:
                num_seqs, _, max_q, max_ctx = mask.shape
                mask = mask.unsqueeze(2).expand(-1, -1, group, -1, -1).reshape(num_seqs, 1, group * max_q, max_ctx)
            self._masks[key] = mask
        return self._masks[key]

    def _build_mask(self, sliding_window: int | None) -> torch.Tensor:
        dev = self.device
        q_lens = torch.tensor(self.query_lens).to(dev)[:, None, None]  # [B, 1, 1]
        ctx = torch.tensor(self.context_lens).to(dev)[:, None, None]
        max_q = self.query_index.shape[1]
        max_ctx = self.block_tables.shape[1] * self.block_size
        q_slot = ctx - q_lens + torch.arange(max_q, device=dev)[None, :, None]  # [B, max_q, 1]
        q_pos = q_slot
        if self.explicit_positions or self.tree_mask is not None:  # padded rows: position 0
            q_pos = torch.cat([self.positions, self.positions.new_zeros(1)])[self.query_index][:, :, None]
        k_pos = torch.arange(max_ctx, device=dev)[None, None, :]  # [1, 1, max_ctx] (a key's slot)
        mask = k_pos <= (q_slot if self.tree_mask is not None else q_pos)
        if self.tree_mask is not None:  # a new key is seen by its tree descendants only
            first = ctx - q_lens  # [B, 1, 1] slot of each sequence's first new token
            rel = (k_pos - first).clamp(0, max_q - 1).expand(-1, max_q, -1)  # [B, max_q, max_ctx]
            mask &= (k_pos < first) | self.tree_mask.gather(2, rel)
        if sliding_window is not None:  # by position; a tree's keys sit at slots >= their positions
            mask &= k_pos > q_pos - sliding_window
        # Padded query rows attend to key 0 only, so softmax never sees an all-masked row (NaN).
        pad_rows = torch.arange(max_q, device=dev)[None, :, None] >= q_lens
        mask |= pad_rows & (k_pos == 0)
        return mask[:, None]


def tree_layout(query_lens: list[int], trees: list[list[int] | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (shift [T]: position minus slot of each new token (its depth minus its index in a tree,
    0 outside trees), tree_mask [B, max_q, max_q]: True where new token i of a sequence may see its
    new token j: j is i or an ancestor of i, or j <= i for a sequence without a tree (causal))."""
    max_q = max(query_lens)
    mask = np.tril(np.ones((max_q, max_q), dtype=bool))[None].repeat(len(query_lens), axis=0)
    shift: list[int] = []
    for b, (q, parents) in enumerate(zip(query_lens, trees)):
        if parents is None:
            shift += [0] * q
            continue
        assert len(parents) == q and parents[0] == -1 and all(p < i for i, p in enumerate(parents)), parents
        seen = mask[b, :q, :q]  # row i: i and its ancestors, built from its parent's row
        seen[:] = np.eye(q, dtype=bool)
        depth = [0] * q
        for i in range(1, q):
            seen[i] |= seen[parents[i]]
            depth[i] = depth[parents[i]] + 1
        shift += [d - i for i, d in enumerate(depth)]
    return torch.tensor(shift, dtype=torch.long), torch.from_numpy(mask)


def move_kv(kv_cache: KVCache, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy the KV in flat pool slots src [N] to slots dst [N] in every layer (an accepted draft
    tree path moves to consecutive slots). All sources are read before any destination is written."""
    for k_cache, v_cache in kv_cache:
        for part in (k_cache, v_cache):
            if part.shape[-1]:
                flat = part.view(-1, *part.shape[2:])
                flat[dst] = flat[src]


def write_kv(cache: tuple[torch.Tensor, torch.Tensor], batch: AttentionBatch, k: torch.Tensor, v: torch.Tensor):
    """Store this step's keys/values. k: [T, kv_heads, k_dim], v: [T, kv_heads, v_dim]."""
    write_slots(cache, batch.slot_mapping, k, v)


def write_slots(cache: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor, k: torch.Tensor, v) -> None:
    """Write KV rows k [N, kv_heads, k_dim], v [N, kv_heads, v_dim] (or None: no values) into flat
    pool slots [N]."""
    k_cache, v_cache = cache
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    if v is not None and v_cache.shape[-1]:
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def gather_context(cache_part: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
    """[num_blocks, block_size, heads, d] pool -> [B, max_blocks * block_size, heads, d] contexts
    (whole blocks: one contiguous copy per block; keys past a sequence's length are masked)."""
    tables = batch.block_tables
    blocks = cache_part.index_select(0, tables.reshape(-1))  # [B * max_blocks, block_size, heads, d]
    return blocks.view(tables.shape[0], -1, *cache_part.shape[2:])


def pad_queries(x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
    """[T, ...] flat tokens -> [B, max_q, ...] padded with zero rows."""
    if batch.is_decode_only:  # one token per sequence: nothing to pad
        return x.unsqueeze(1)
    padded = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
    return padded[batch.query_index]


def unpad_queries(x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
    """[B, max_q, ...] -> [T, ...] in the flat token order."""
    if batch.is_decode_only:
        return x.reshape(-1, *x.shape[2:])
    return x.reshape(-1, *x.shape[2:])[batch.token_index]


def attend(
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention of new tokens over their sequences' contexts.

    q: [T, heads, k_dim]; k_ctx: [B, max_ctx, kv_heads, k_dim]; v_ctx: [B, max_ctx, kv_heads, v_dim].
    Returns [T, heads, v_dim].
    """
    heads, kv_heads = q.shape[1], k_ctx.shape[2]
    group = heads // kv_heads
    qp = pad_queries(q, batch)  # [B, max_q, heads, k_dim]
    num_seqs, max_q = qp.shape[:2]
    # GQA without copying K/V per head: query head h uses kv head h // group, so fold each kv head's
    # `group` query heads into its query rows: [B, kv_heads, group * max_q, k_dim].
    qp = qp.view(num_seqs, max_q, kv_heads, group, -1).permute(0, 2, 3, 1, 4).reshape(num_seqs, kv_heads, group * max_q, -1)
    mask = batch.mask(sliding_window, group)  # [B, 1, group * max_q, max_ctx]
    out = F.scaled_dot_product_attention(qp, k_ctx.transpose(1, 2), v_ctx.transpose(1, 2), attn_mask=mask, scale=scale)
    out = out.view(num_seqs, kv_heads, group, max_q, -1).permute(0, 3, 1, 2, 4)  # [B, max_q, kv_heads, group, v]
    return unpad_queries(out.reshape(num_seqs, max_q, heads, -1), batch)  # [T, heads, v_dim]


def _padded(block_tables: list[list[int]], width: int) -> np.ndarray:
    """Each table's first `width` blocks, padded with block 0 -> [B, width] int64 (in one pass where
    every table has exactly `width`, as in most decode steps)."""
    if all(len(t) == width for t in block_tables):
        return np.fromiter(itertools.chain.from_iterable(block_tables), np.int64, len(block_tables) * width).reshape(-1, width)
    return np.array([t[:width] + [0] * (width - len(t[:width])) for t in block_tables], np.int64).reshape(-1, width)
