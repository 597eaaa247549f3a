"""Attention over the paged KV without padding every sequence to the step's longest one.

A step mixes decodes (one new token each) and prompt chunks (many). The padded path
(`paged.attend`) lays all of them out as `[B, max_q, max_ctx]`, so one 200-token prompt beside 31
decodes makes every decode attend with 200 query rows. Here instead:
- decodes run in one call of raymoe's C kernel straight from the pool (`raymoe.model.native.decode`,
  on CPU where it is built); else as batched SDPA over their gathered context blocks, in a few
  groups of similar context length (sorted, split where padding to the group's longest costs more
  than another group's ops);
- each prompt chunk's rows whose context is short enough for its K + V to stay in a core's L2
  (`PREFILL_KERNEL_BYTES`) run in that C kernel too, each row as a decode at its own position (the
  kernel reads each row's keys once, with no causal padding and no tiles over masked keys: faster
  than torch's flash kernel there, `bench/kernel_costs.py --sections prompt_attention`); the rest of
  each chunk runs causal SDPA over its own new tokens, plus its cached prefix gathered from the pool
  when it has one. Which rows take the kernel depends on their position alone, so such a row has the
  same bits however its prompt is chunked.

`plan_for(batch)` is built once per step (on first use) and shared by every layer: gather indices,
row indices and additive masks. Batches with draft trees or explicit positions keep the padded path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from raymoe.model.host import ints
from raymoe.model.native import decode as native

GROUP_COST_KEYS = 512  # one more decode group costs about as much as attending over this many keys
GATHER_BYTES = 512 << 10  # most K + V bytes one decode SDPA call gathers (about a quarter of an L2)
PREFILL_KERNEL_BYTES = 384 << 10  # most K + V bytes a prompt row's context spans in the C kernel (read
# per row: from L2 it beats SDPA's tiles, from L3 it does not)


@dataclass
class DecodeGroup:
    """n decodes padded to the same number of context blocks."""

    rows: torch.Tensor | slice  # their rows among the step's T tokens ([n] index, or a slice)
    blocks: torch.Tensor  # [n * num_blocks] their context blocks, flattened
    ctx_lens: torch.Tensor  # [n]
    num_blocks: int
    masks: dict  # sliding window (None: full) -> [n, 1, 1, num_blocks * block_size] additive mask, or None
    all_full: bool = False  # every member's context fills its num_blocks (known on the host)
    row_list: tuple = ()  # [n] rows on the host, ascending

    def pieces(self, block_bytes: int) -> list[slice]:
        """Ranges of members whose gathered K + V (block_bytes a block) fit GATHER_BYTES, one member
        at least: SDPA then reads the copy from the core's cache. Each member's attention is the
        same computation whichever call it is in."""
        n = self.ctx_lens.shape[0]
        per = max(1, GATHER_BYTES // (self.num_blocks * block_bytes))
        return [slice(s, min(n, s + per)) for s in range(0, n, per)]

    def rows_of(self, part: slice) -> torch.Tensor | slice:
        """The step's rows of members `part`."""
        if isinstance(self.rows, slice):
            return slice(self.rows.start + part.start, self.rows.start + part.stop)
        return _as_slice(self.row_list[part]) or self.rows[part]


@dataclass
class PrefillPart:
    """One sequence's chunk of new tokens: rows start..stop, its context (cached + new) ctx_len long."""

    start: int
    stop: int
    ctx_len: int
    blocks: torch.Tensor | None  # [num_blocks] its context blocks; None when the chunk is all of it
    masks: dict  # (sliding window, first row) -> [stop - first, ctx] additive mask, or None (plain causal)
    seq: int = 0  # its sequence in the step

    def kernel_stop(self, max_keys: int) -> int:
        """Rows start..the returned one see at most max_keys keys each (their own context)."""
        return self.start + max(0, min(self.stop - self.start, max_keys - (self.ctx_len - (self.stop - self.start))))


@dataclass
class RaggedPlan:
    prefills: list[PrefillPart]
    block_size: int
    decode_layout: tuple  # (decoding sequences [n], context_lens [B], row starts [B + 1], tables [B, max_blocks])
    buffers: dict = field(default_factory=dict)  # (k or v, dtype) -> gather target, reused by every layer
    native: native.Decodes | None = None  # every decode at once, for the C kernel (where it is built)
    prefill_kernel: bool = False  # prompt rows may run in the C kernel (built, on CPU)
    _groups: list | None = None
    _prefill_rows: dict = field(default_factory=dict)  # max keys -> (native.Decodes or None, [row stop per part])

    @property
    def has_decodes(self) -> bool:
        return bool(self.decode_layout[0])

    @property
    def decodes(self) -> list[DecodeGroup]:
        """The decodes in groups for torch's SDPA (built on first use: not needed where the kernel runs)."""
        if self._groups is None:
            self._groups = decode_groups(*self.decode_layout, self.block_size)
        return self._groups

    def prefill_rows(self, max_keys: int) -> tuple[native.Decodes | None, list[int]]:
        """The prompt rows that see at most max_keys keys, as decodes at their own positions for the C
        kernel (None: none), and each part's first row left to SDPA."""
        if max_keys not in self._prefill_rows:
            stops = [p.kernel_stop(max_keys) for p in self.prefills]
            taken = [(p, stop) for p, stop in zip(self.prefills, stops) if stop > p.start]
            decodes = _as_decodes(taken, self.decode_layout[3], self.block_size) if taken else None
            self._prefill_rows[max_keys] = (decodes, stops)
        return self._prefill_rows[max_keys]

    def gather(self, part: str, pool: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """pool [num_blocks, block_size, heads, d] -> its `blocks` [N] as [N, block_size, heads, d], in
        a buffer of this step (a fresh allocation per layer costs as much as the copy itself)."""
        key = (part, pool.dtype, pool.shape[2:])
        buf = self.buffers.get(key)
        if buf is None or buf.shape[0] < blocks.shape[0]:  # grows in the first layer only
            buf = self.buffers[key] = pool.new_empty(blocks.shape[0], *pool.shape[1:])
        return torch.index_select(pool, 0, blocks, out=buf[: blocks.shape[0]])


def plan_for(batch) -> RaggedPlan | None:
    """The step's plan (built on first use, cached on the batch); None where the padded path runs."""
    if batch.trees is not None or batch.explicit_positions:
        return None
    if batch._plan is None:
        batch._plan = build_plan(batch.query_lens, batch.context_lens, batch.block_tables, batch.block_size)
    return batch._plan


def build_plan(query_lens: list[int], context_lens: list[int], tables: torch.Tensor, block_size: int) -> RaggedPlan:
    """tables: [B, max_blocks] each sequence's blocks (padded)."""
    dev, bs = tables.device, block_size
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    decodes = [b for b, q in enumerate(query_lens) if q == 1]
    prefills = []
    for b, q in enumerate(query_lens):
        if q == 1:
            continue
        ctx = context_lens[b]
        blocks = None if ctx == q else tables[b, : -(-ctx // bs)]
        prefills.append(PrefillPart(starts[b], starts[b] + q, ctx, blocks, {}, b))
    kernel = dev.type == "cpu" and native.available()
    plan = RaggedPlan(prefills, bs, (decodes, context_lens, starts, tables), prefill_kernel=bool(prefills) and kernel)
    if decodes and kernel:
        if len(decodes) == len(query_lens):  # decodes only: their rows, contexts and tables as they are
            rows, ctx, own = torch.arange(len(decodes), device=dev), ints(context_lens).to(dev), tables.contiguous()
        else:
            rows, ctx = ints([starts[b] for b in decodes]).to(dev), ints([context_lens[b] for b in decodes]).to(dev)
            own = tables.index_select(0, ints(decodes).to(dev)).contiguous()
        plan.native = native.Decodes(rows, ctx, own, {})
    return plan


def _as_decodes(taken: list[tuple[PrefillPart, int]], tables: torch.Tensor, block_size: int) -> native.Decodes:
    """Rows start..stop of each (part, stop) as decodes at their own positions: row i of a part of q
    new tokens sees ctx_len - q + (i - start) + 1 keys of its sequence's blocks (`tables` [B, max_blocks])."""
    rows = torch.cat([torch.arange(p.start, stop) for p, stop in taken])
    ctx = torch.cat([torch.arange(stop - p.start) + p.ctx_len - (p.stop - p.start) + 1 for p, stop in taken])
    seqs = ints([p.seq for p, stop in taken for _ in range(stop - p.start)]).to(tables.device)
    width = -(-int(ctx.max()) // block_size)
    return native.Decodes(rows.to(tables.device), ctx.to(tables.device), tables[:, :width].index_select(0, seqs), {})


def decode_groups(decodes: list[int], context_lens: list[int], starts: list[int], tables: torch.Tensor,
                  bs: int) -> list[DecodeGroup]:
    """The decoding sequences `decodes` in groups of similar context length (`split_groups`)."""
    dev, groups = tables.device, []
    for members in split_groups(sorted(decodes, key=lambda b: context_lens[b]), context_lens, bs):
        nb = -(-context_lens[members[-1]] // bs)  # the longest member's
        members = sorted(members)  # in row order, so runs of rows are slices (any order gives the same bits)
        ctx = ints([context_lens[b] for b in members]).to(dev)  # made on the host, then moved
        row_list = tuple(starts[b] for b in members)
        rows = _as_slice(row_list) or ints(row_list).to(dev)
        idx = ints(members).to(dev)
        all_full = all(context_lens[b] == nb * bs for b in members)
        groups.append(DecodeGroup(rows, tables[idx, :nb].reshape(-1), ctx, nb, {}, all_full, row_list))
    return groups


def _as_slice(rows: tuple) -> slice | None:
    """Ascending rows -> the slice they make when consecutive, else None."""
    return slice(rows[0], rows[-1] + 1) if rows[-1] - rows[0] == len(rows) - 1 else None


def split_groups(order: list[int], context_lens: list[int], block_size: int) -> list[list[int]]:
    """Decodes sorted by context length -> consecutive groups minimising padded keys plus a fixed cost
    per group (`GROUP_COST_KEYS`); dynamic programming over the split points."""
    n = len(order)
    if n == 0:
        return []
    keys = [-(-context_lens[b] // block_size) * block_size for b in order]  # padded length of each
    if n * keys[-1] - sum(keys) < GROUP_COST_KEYS:  # one group pads less than a second group costs:
        return [order]  # every split costs more (the search below finds the same)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)  # best[i]: cost of the first i
    for i in range(1, n + 1):
        for j in range(i):  # group j..i-1, padded to keys[i - 1]
            cost = best[j] + (i - j) * keys[i - 1] + GROUP_COST_KEYS
            if cost < best[i]:
                best[i], cut[i] = cost, j
    groups, i = [], n
    while i:
        groups.append(order[cut[i] : i])
        i = cut[i]
    return groups[::-1]


def decode_mask(group: DecodeGroup, block_size: int, window: int | None, dtype, device) -> torch.Tensor | None:
    """[n, 1, 1, keys] additive: 0 where a decode sees a key (before its context's end, in window)."""
    if window not in group.masks:
        num_keys = group.num_blocks * block_size
        if group.all_full and (window is None or window >= num_keys):  # sees every key: no mask
            group.masks[window] = None
            return None
        keys = torch.arange(num_keys).to(device)[None, :]
        last = group.ctx_lens[:, None] - 1  # each decode's own position
        seen = keys <= last
        if window is not None:
            seen &= keys > last - window
        group.masks[window] = additive(seen, dtype)[:, None, None, :]
    return group.masks[window]


def prefill_mask(part: PrefillPart, keys: int, window: int | None, dtype, device, first: int) -> torch.Tensor | None:
    """[stop - first, keys] additive for the part's rows first..stop: causal by position (row i sits
    at ctx - q + i - start), in window; None when plain `is_causal` over the chunk's own tokens says
    the same."""
    if (window, first) not in part.masks:
        q = part.stop - part.start
        if part.blocks is None and window is None and first == part.start:
            part.masks[window, first] = None
        else:
            pos = part.ctx_len - q + torch.arange(first - part.start, q).to(device)[:, None]
            k = torch.arange(keys).to(device)[None, :]
            seen = k <= pos
            if window is not None:
                seen &= k > pos - window
            part.masks[window, first] = additive(seen, dtype)
    return part.masks[window, first]


def additive(seen: torch.Tensor, dtype) -> torch.Tensor:
    """bool -> 0 / -inf (SDPA converts a bool mask this way on every call; once per step here)."""
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, float("-inf"))


def attend_decodes(q, cache, plan: RaggedPlan, g: DecodeGroup, part: slice, mask, scale: float) -> torch.Tensor:
    """The decodes `part` (a range of members) of group g: q [T, heads, d] -> [m, heads, v_dim];
    mask: the group's [n, 1, 1, keys] or None."""
    k_cache, v_cache = cache
    kv_heads, d = k_cache.shape[2], k_cache.shape[3]
    m, nb = part.stop - part.start, g.num_blocks
    keys, blocks = nb * plan.block_size, g.blocks[part.start * nb : part.stop * nb]
    kc = plan.gather("k", k_cache, blocks).view(m, keys, kv_heads, d).transpose(1, 2)  # [m, kv_heads, keys, d]
    vc = plan.gather("v", v_cache, blocks).view(m, keys, kv_heads, -1).transpose(1, 2)
    rows = g.rows_of(part)
    qg = q[rows] if isinstance(rows, slice) else q.index_select(0, rows)
    mask = None if mask is None else mask[part]
    res = F.scaled_dot_product_attention(qg.view(m, kv_heads, -1, d), kc, vc, attn_mask=mask, scale=scale)
    return res.reshape(m, q.shape[1], -1)  # query head h read kv head h // group


def attend_ragged(q, k, v, cache, plan: RaggedPlan, scale: float, window: int | None = None) -> torch.Tensor:
    """q: [T, heads, d]; k, v: [T, kv_heads, d] this step's (already written into `cache`, a
    (k_cache, v_cache) pool pair) -> [T, heads, v_dim]."""
    k_cache, v_cache = cache
    kv_heads, d = k_cache.shape[2], k_cache.shape[3]
    heads, group = q.shape[1], q.shape[1] // kv_heads
    out = q.new_empty(q.shape[0], heads, v_cache.shape[3])
    if plan.has_decodes and not (plan.native and native.attend(q, cache, plan.native, out, scale, window)):
        only = attend_decode_groups(q, cache, plan, scale, window, out)
        if only is not None:
            return only
    stops = [p.start for p in plan.prefills]
    if plan.prefill_kernel:
        key_bytes = kv_heads * (d + v_cache.shape[3]) * k_cache.element_size()
        rows, kernel_stops = plan.prefill_rows(PREFILL_KERNEL_BYTES // key_bytes)
        if rows is not None and native.attend(q, cache, rows, out, scale, window):
            stops = kernel_stops
    for p, first in zip(plan.prefills, stops):
        if first == p.stop:  # every row in the kernel
            continue
        if p.blocks is None:  # the chunk is its whole context: its own new keys
            kc, vc = k[p.start : p.stop], v[p.start : p.stop]
        else:
            kc = plan.gather("k", k_cache, p.blocks).view(-1, kv_heads, d)
            vc = plan.gather("v", v_cache, p.blocks).view(-1, kv_heads, v_cache.shape[3])
        mask = prefill_mask(p, kc.shape[0], window, q.dtype, q.device, first)
        res = F.scaled_dot_product_attention(
            q[first : p.stop].transpose(0, 1)[None], kc.transpose(0, 1)[None], vc.transpose(0, 1)[None],
            attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=group > 1,
        )  # [1, heads, stop - first, v_dim]
        out[first : p.stop] = res[0].transpose(0, 1)
    return out


def attend_decode_groups(q, cache, plan: RaggedPlan, scale: float, window: int | None, out) -> torch.Tensor | None:
    """The decodes through torch's SDPA, a call per group piece, into out [T, heads, v_dim]; where the
    step is one piece of decodes only, its result instead (returned; out untouched)."""
    rows = plan.decodes[0].rows
    only = len(plan.decodes) == 1 and not plan.prefills and isinstance(rows, slice) and rows == slice(0, q.shape[0])
    block_bytes = cache[0][0].nbytes + cache[1][0].nbytes  # one block of K and of V
    for g in plan.decodes:
        mask = decode_mask(g, plan.block_size, window, q.dtype, q.device)
        pieces = g.pieces(block_bytes)
        if only and len(pieces) == 1:
            return attend_decodes(q, cache, plan, g, pieces[0], mask, scale)
        for part in pieces:
            res, rows = attend_decodes(q, cache, plan, g, part, mask, scale), g.rows_of(part)
            if isinstance(rows, slice):
                out[rows] = res
            else:
                out.index_copy_(0, rows, res)
    return None
