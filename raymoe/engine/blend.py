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
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from raymoe.engine.chunks import ChunkKV, kv_deviation, select_recompute
from raymoe.model.paged import AttentionBatch, write_kv


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


@torch.inference_mode()
def blend_forward(model, kv_cache, block_table: list[int], block_size: int, token_ids: torch.Tensor,
                  start: int, placed: PlacedChunks, share: float | None) -> tuple[torch.Tensor, int]:  # fmt: skip
    """Fill the KV of positions [start, start + R) of a sequence whose KV before `start` is cached.

    token_ids: [R] the region's tokens. Returns (active offsets [A] long: the tokens computed in every
    layer, ascending; token-layers computed)."""
    num_tokens, end, device = token_ids.shape[0], start + token_ids.shape[0], token_ids.device
    full = AttentionBatch.build([num_tokens], [end], [block_table], block_size, device=device)
    cos, sin = model.rotary.cos_sin(full.positions, model.dtype)
    slots = full.slot_mapping[placed.offsets]
    for (k, v), cache in list(zip(placed.kv, kv_cache))[1:]:  # layer 0 is computed for every token
        _write_rows(cache, slots, k, v)
    experts, layers = model.experts, model.layers
    h = layers[0](model.embed[token_ids], full, kv_cache[0], (cos, sin), experts)
    if len(layers) == 1:
        return torch.arange(num_tokens, device=device), num_tokens
    fresh_k, fresh_v = layers[1].attn.cache_entries(layers[1].input_norm(h), (cos, sin))  # [R, h, d]
    k1, v1 = placed.kv[1]
    idx = placed.offsets
    dev = kv_deviation(fresh_k[idx], None if fresh_v is None else fresh_v[idx], k1, v1)
    write_kv(kv_cache[1], full, fresh_k, fresh_v)
    is_chunk = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    is_chunk[idx] = True
    active_mask = ~is_chunk
    active_mask[idx[select_recompute(dev, share)]] = True
    active = active_mask.nonzero().flatten()  # [A] ascending
    if active.numel() == 0:
        return active, num_tokens
    sub = AttentionBatch.build([active.numel()], [end], [block_table], block_size,
                               positions=[(active + start).tolist()], device=device)  # fmt: skip
    h, cos_sin = h[active], (cos[active], sin[active])
    for layer, cache in zip(layers[1:], kv_cache[1:]):
        h = layer(h, sub, cache, cos_sin, experts)
    return active, num_tokens + active.numel() * (len(layers) - 1)


def _write_rows(cache: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor, k: torch.Tensor, v) -> None:
    """Write KV rows k [N, h, k_dim], v [N, h, v_dim] (or None) into flat pool slots [N]."""
    k_cache, v_cache = cache
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    if v is not None and v_cache.shape[-1]:
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


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


class Blender:
    """The engine's chunk-reuse step: before a step runs, each newly admitted sequence with a
    `BlendPlan` gets its blend region filled (`blend_forward`) and its cached count moved to the
    plan's end; the rest of its prompt then prefills as usual. Without a chunk store (a decode
    worker) a plan is ignored: the prompt computes in full, or comes from imported blocks.

    Chunk work shares the scheduler's token budget: the tokens a step schedules for such a sequence
    pay first for its chunks missing from the store (each computed alone, at least one per step),
    then for the blend region; the prompt's remaining tokens get what is left. A sequence still
    gathering chunks sits the model run out, so one request with many chunks cannot stall a step."""

    def __init__(self, runner, block_manager, block_size: int, store=None):
        self.runner, self.block_manager, self.block_size, self.store = runner, block_manager, block_size, store
        self.stats = {"blended_requests": 0, "chunk_tokens_placed": 0, "chunk_tokens_recomputed": 0,
                      "blend_token_layers": 0, "chunk_prefill_tokens": 0}  # fmt: skip
        # chunk KV gathered so far per sequence (index in its plan -> KV, None: compute as usual);
        # weak keys: an aborted sequence's entry goes with it
        self._gathered: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def model(self):
        """The MoEModel (under a microbatch pipeline wrapper, if any)."""
        m = self.runner.model
        return m if hasattr(m, "layers") else m.model

    def run_pending(self, scheduled: list) -> list:
        """Gather chunks and blend where due, within each sequence's scheduled tokens; returns the
        schedule with each such sequence's new-token count cut to what its budget has left (a
        sequence left with none is dropped from this step's run)."""
        out = []
        for seq, n in scheduled:
            plan = seq.blend_plan
            if plan is not None and self.store is not None and seq.num_cached_tokens < plan.end:
                n = self._advance(seq, plan, n)
            if n > 0:
                out.append((seq, n))
        return out

    def _advance(self, seq, plan, budget: int) -> int:
        """Spend up to `budget` tokens on seq's chunks and blend; returns the tokens left for its prompt."""
        start = seq.num_cached_tokens
        todo = [i for i, (_, e) in enumerate(plan.spans) if e > start]
        kvs, spent = self._chunk_kvs(seq, plan, todo, budget)
        region = plan.end - start
        if kvs is None or (spent and spent + region > budget):
            return 0  # chunks still missing, or no room left for the region: the next steps
        self._gathered.pop(seq, None)
        if not self._blend(seq, plan, todo, kvs):
            return budget - spent
        return min(max(budget - spent - region, 0), len(seq) - seq.num_cached_tokens)

    def _blend(self, seq, plan, todo: list[int], kvs: dict) -> bool:
        start = seq.num_cached_tokens
        offsets, parts, used = [], [], []
        for i in todo:
            if kvs[i] is None:
                continue  # not cached and no room to compute it alone: its tokens compute as usual
            s, e = plan.spans[i]
            lo = max(s, start)
            parts.append(place_chunk(self.model, kvs[i], slice(lo - s, e - s), s))
            offsets.append(torch.arange(lo - start, e - start, device=self.runner.device))
            used.append(i)
        if not used:
            return False
        layers = list(zip(*parts))  # per layer: one (k, v) per chunk
        kv = [(torch.cat([k for k, _ in layer]), None if layer[0][1] is None else torch.cat([v for _, v in layer]))
              for layer in layers]  # fmt: skip
        placed = PlacedChunks(torch.cat(offsets), kv)
        tokens = torch.tensor(seq.token_ids[start : plan.end], dtype=torch.long).to(self.runner.device)
        active, token_layers = blend_forward(self.model, self.runner.kv_cache, seq.block_table, self.block_size,
                                             tokens, start, placed, plan.share)  # fmt: skip
        seq.num_cached_tokens = plan.end
        is_active = torch.zeros(len(tokens), dtype=torch.bool, device=tokens.device)
        is_active[active] = True
        saved = [int((~is_active[o]).sum()) for o in offsets]
        self._account(plan, used, sum(o.numel() for o in offsets), saved, token_layers)
        return True

    def _account(self, plan, used: list[int], placed: int, saved: list[int], token_layers: int) -> None:
        """Statistics; `saved`: per used chunk, its placed tokens not recomputed."""
        st = self.stats
        st["blended_requests"] += 1
        st["chunk_tokens_placed"] += placed
        st["chunk_tokens_recomputed"] += placed - sum(saved)
        st["blend_token_layers"] += token_layers
        self.store.credit_chunks([plan.keys[i] for i in used], saved)

    def _chunk_kvs(self, seq, plan, todo: list[int], budget: int) -> tuple[dict | None, int]:
        """KV of the plan's chunks `todo` (None while some are still missing) and the tokens spent:
        stored ones are read; misses are computed alone (and stored) while `budget` lasts."""
        from raymoe.engine.chunks import pack_chunk_kv, unpack_chunk_kv

        have = self._gathered.setdefault(seq, {})
        missing = [i for i in todo if i not in have]
        got = self.store.get_chunks([plan.keys[i] for i in missing]) if missing else []
        spent, new = 0, []
        for i, flat in zip(missing, got):
            s = plan.spans[i][0]
            if flat is not None:
                have[i] = unpack_chunk_kv(flat.to(self.runner.device), plan.lengths[i], self.model.kv_layout())
            elif spent < budget:
                have[i] = self._compute_alone(seq.token_ids[s : s + plan.lengths[i]])
                spent += plan.lengths[i]
                if have[i] is not None:
                    new.append(i)
        if new:
            self.store.put_chunks([plan.keys[i] for i in new], [pack_chunk_kv(have[i]) for i in new],
                                  [plan.lengths[i] for i in new])  # fmt: skip
        return (have if all(i in have for i in todo) else None), spent

    def _compute_alone(self, tokens: list[int]):
        """A chunk's KV computed on its own at positions 0.. (None: no free blocks for it). Its full
        blocks stay cached as plain prefix blocks: that is exactly what they are."""
        from raymoe.engine.sampling_params import SamplingParams
        from raymoe.engine.sequence import Sequence

        bm, n = self.block_manager, len(tokens)
        scratch = Sequence(tokens, SamplingParams())
        if not bm.can_allocate(scratch):
            return None
        cached = bm.allocate(scratch)
        try:
            device = self.runner.device
            batch = AttentionBatch.build([n - cached], [n], [scratch.block_table], self.block_size, device=device)
            ids = torch.tensor(tokens[cached:], dtype=torch.long).to(device)
            self.runner.model.forward(ids, batch, self.runner.kv_cache)
            self.stats["chunk_prefill_tokens"] += n - cached
            kv = gather_rows(self.runner.kv_cache, scratch.block_table, self.block_size, n)
            scratch.num_cached_tokens = n
            bm.cache_blocks(scratch)
        finally:
            bm.free(scratch)
        return kv
