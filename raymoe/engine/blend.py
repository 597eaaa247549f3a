"""The chunk-reuse prefill (CacheBlend's selective recompute) over the paged KV cache.

For a sequence's blend region [start, end) (`chunks.BlendPlan`): every cached chunk's KV is placed
at its new position (keys re-rotated), then

- layer 0 runs for every region token with the full context (its KV does not depend on context,
  only on position, so this repairs nothing but gives the hidden states the next step needs);
- layer 1's KV is computed for every region token; its deviation from the placed chunk KV picks the
  chunk tokens to recompute (`chunks.select_recompute`); layer 1 keeps the fresh KV of all tokens;
- layers 1.. run only the *active* tokens (non-chunk tokens and the chosen chunk tokens) over the
  whole context, overwriting their KV; the other chunk tokens keep the placed KV.

With a share of 1 every token is active: the same arithmetic as a plain prefill of the region.
A `BlendJob` runs this in pieces of a step's token budget (`raymoe.engine.chunk_work.Blender`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.engine.chunks import ChunkKV, kv_deviation, select_recompute
from raymoe.model.paged import AttentionBatch, write_kv, write_slots


@dataclass
class PlacedChunks:
    """Region-relative chunk tokens and their cached KV, already turned to their new positions.

    offsets: [N] long, index within the region of each chunk token (ascending).
    kv: per layer (keys [N, h, k_dim], values [N, h, v_dim] or None)."""

    offsets: torch.Tensor
    kv: ChunkKV


def place_chunk(model, kv: ChunkKV, rows: slice, start: int) -> ChunkKV:
    """A stored chunk's KV rows (computed at positions 0..) moved to positions start + rows: keys
    re-rotated by `start` per layer, values unchanged. kv: per layer keys [n, h, k_dim]."""
    out = []
    for layer, (k, v) in zip(model.layers, kv):
        k = k[rows]
        delta = torch.full((k.shape[0],), start, dtype=torch.long, device=k.device)
        out.append((layer.attn.rerotate_keys(k, delta), None if v is None else v[rows]))
    return out


@dataclass
class BlendJob:
    """One sequence's blend of positions [start, start + R), run in pieces over steps.

    Pass 1 (`run_first`) takes the region in order: layer 0 for each token with the full context,
    layer 1's fresh KV, and each chunk token's deviation from its placed KV. Once every token has
    had it, the active set is chosen over the whole region (as in one go) and pass 2
    (`run_active`) runs layers 1.. for the active tokens in order. Causal attention makes pieces
    the same arithmetic as one pass: a piece sees only KV written by earlier pieces or placed.

    tokens: [R] long; hidden: [R, H] layer-0 output; deviation: [N] per placed chunk token;
    active: [A] long region offsets (set when pass 1 ends)."""

    start: int
    tokens: torch.Tensor
    placed: PlacedChunks
    share: float | None
    hidden: torch.Tensor | None = None
    deviation: torch.Tensor | None = None
    num_first: int = 0  # region tokens through pass 1
    active: torch.Tensor | None = None
    num_active_done: int = 0  # active tokens through pass 2
    token_layers: int = 0

    @property
    def is_done(self) -> bool:
        return self.active is not None and self.num_active_done == self.active.numel()


def start_job(model, kv_cache, block_table: list[int], block_size: int, token_ids: torch.Tensor,
              start: int, placed: PlacedChunks, share: float | None) -> BlendJob:  # fmt: skip
    """A blend of positions [start, start + R) of a sequence whose KV before `start` is cached;
    writes the placed chunk KV of layers 1.. (layer 0 is computed for every token).
    token_ids: [R] the region's tokens."""
    end = start + token_ids.shape[0]
    table = AttentionBatch.build([token_ids.shape[0]], [end], [block_table], block_size, device=token_ids.device)
    slots = table.slot_mapping[placed.offsets]
    for (k, v), cache in list(zip(placed.kv, kv_cache))[1:]:
        write_slots(cache, slots, k, v)
    return BlendJob(start, token_ids, placed, share)


@torch.inference_mode()
def run_first(model, kv_cache, block_table: list[int], block_size: int, job: BlendJob, num_tokens: int) -> None:
    """Pass 1 for the next `num_tokens` region tokens (at least one); picks the active set after the last."""
    a = job.num_first
    b = min(a + max(num_tokens, 1), job.tokens.shape[0])
    device, start = job.tokens.device, job.start
    batch = AttentionBatch.build([b - a], [start + b], [block_table], block_size, device=device)
    cos_sin = model.rotary.cos_sin(batch.positions, model.dtype)
    h = model.layers[0](model.embed[job.tokens[a:b]], batch, kv_cache[0], cos_sin, model.experts)  # [b - a, H]
    if job.hidden is None:
        job.hidden = h.new_empty(job.tokens.shape[0], h.shape[1])
        job.deviation = torch.zeros(job.placed.offsets.numel(), device=device)
    job.hidden[a:b] = h
    if len(model.layers) > 1:
        _first_layer_kv(model, kv_cache[1], batch, job, h, cos_sin, (a, b))
    job.num_first, job.token_layers = b, job.token_layers + b - a
    if b == job.tokens.shape[0] and len(model.layers) > 1:
        job.active = _active(job)
    elif b == job.tokens.shape[0]:  # one layer: layer 0 computed every token exactly, nothing left
        job.active, job.num_active_done = torch.arange(b, device=device), b


def _first_layer_kv(model, cache, batch: AttentionBatch, job: BlendJob, h, cos_sin, piece: tuple[int, int]) -> None:
    """Layer 1's fresh KV of the piece [a, b) into the cache, and its chunk tokens' deviations."""
    a, b = piece
    layer = model.layers[1]
    fresh_k, fresh_v = layer.attn.cache_entries(layer.input_norm(h), cos_sin)  # [b - a, h, d]
    offsets = job.placed.offsets
    lo, hi = (int(torch.searchsorted(offsets, x)) for x in (a, b))  # the piece's placed tokens
    if hi > lo:
        rows = offsets[lo:hi] - a
        k1, v1 = job.placed.kv[1]
        job.deviation[lo:hi] = kv_deviation(fresh_k[rows], None if fresh_v is None else fresh_v[rows],
                                            k1[lo:hi], None if v1 is None else v1[lo:hi])  # fmt: skip
    write_kv(cache, batch, fresh_k, fresh_v)


def _active(job: BlendJob) -> torch.Tensor:
    """[A] long, ascending: the tokens layers 1.. compute: every non-chunk token and the chosen chunk tokens."""
    num_tokens, idx = job.tokens.shape[0], job.placed.offsets
    active_mask = torch.ones(num_tokens, dtype=torch.bool, device=job.tokens.device)
    active_mask[idx] = False
    active_mask[idx[select_recompute(job.deviation, job.share)]] = True
    return active_mask.nonzero().flatten()


@torch.inference_mode()
def run_active(model, kv_cache, block_table: list[int], block_size: int, job: BlendJob, num_tokens: int) -> None:
    """Pass 2 for the next `num_tokens` active tokens (at least one): layers 1.. over the whole context."""
    layers = model.layers
    a = job.num_active_done
    b = min(a + max(num_tokens, 1), job.active.numel())
    idx = job.active[a:b]
    positions = (idx + job.start).tolist()
    sub = AttentionBatch.build([b - a], [positions[-1] + 1], [block_table], block_size,
                               positions=[positions], device=job.tokens.device)  # fmt: skip
    cos_sin = model.rotary.cos_sin(sub.positions, model.dtype)
    h = job.hidden[idx]
    for layer, cache in zip(layers[1:], kv_cache[1:]):
        h = layer(h, sub, cache, cos_sin, model.experts)
    job.num_active_done, job.token_layers = b, job.token_layers + (b - a) * (len(layers) - 1)


def gather_rows(kv_cache, block_table: list[int], block_size: int, num_tokens: int) -> ChunkKV:
    """KV of a sequence's positions [0, num_tokens) from the paged cache (copies): per layer keys
    [n, h, k_dim], values [n, h, v_dim] (None where the layer caches no values)."""
    pos = torch.arange(num_tokens)
    slots = torch.tensor(block_table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size
    slots = slots.to(kv_cache[0][0].device)
    out = []
    for k_cache, v_cache in kv_cache:
        k = k_cache.view(-1, *k_cache.shape[2:]).index_select(0, slots)
        v = v_cache.view(-1, *v_cache.shape[2:]).index_select(0, slots) if v_cache.shape[-1] else None
        out.append((k, v))
    return out
