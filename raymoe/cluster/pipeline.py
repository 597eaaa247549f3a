"""Microbatch pipelining: one step's sequences split into m microbatches, so one microbatch's expert
round trip overlaps another's attention (ping-pong, as in DeepSeek's and CloudMatrix's decode).

For each layer, microbatch i first waits for its experts of the previous layer, then runs this
layer's attention and router and sends its tokens to the experts without waiting. While
microbatch i's tokens are away, microbatches i+1.. run their attention. m = 1 is the plain forward.
Every sequence's math is unchanged: microbatches only reorder independent work.
"""

from __future__ import annotations

import time

import torch

from raymoe.model.paged import AttentionBatch


class PipelinedModel:
    """Wraps a `MoEModel` whose experts backend has `run_async`; same interface as the model."""

    def __init__(self, model, num_microbatches: int):
        assert num_microbatches >= 1
        self.model, self.num_microbatches = model, num_microbatches
        self.spec, self.dtype = model.spec, model.dtype
        self.attention_seconds = 0.0  # time in attention + router, for the step breakdown

    @property
    def tally(self):
        return self.model.tally

    def kv_layout(self):
        return self.model.kv_layout()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, batch: AttentionBatch, kv_cache, experts=None) -> torch.Tensor:
        """input_ids: [T] -> hidden [T, H]; same result as `model.forward`."""
        experts = experts or self.model.experts
        parts = split_batch(batch, self.num_microbatches)
        if len(parts) == 1 or not hasattr(experts, "run_async"):
            return self.model.forward(input_ids, batch, kv_cache, experts)
        hs = [self.model.embed[input_ids[a:b]] for a, b, _ in parts]
        rope = [self.model.rope(mb) for _, _, mb in parts]
        pending: list = [None] * len(parts)
        for layer, cache in zip(self.model.layers, kv_cache):
            for i, (_, _, mb) in enumerate(parts):
                hs[i] = _settle(hs[i], pending[i])
                start = time.perf_counter()
                hs[i], x = layer.attention_part(hs[i], mb, cache, rope[i])
                pending[i] = _launch(layer, x, experts, mb)
                self.attention_seconds += time.perf_counter() - start
        hs = [_settle(h, p) for h, p in zip(hs, pending)]
        return self.model.norm(torch.cat(hs))


def _launch(layer, x: torch.Tensor, experts, batch: AttentionBatch):
    """Start the layer's FFN for x [T_i, H] (microbatch `batch`); a dense layer runs at once."""
    if not layer.is_moe:
        return ("done", layer.ffn(x))
    ids, weights = layer.ffn.route(x, batch)
    return ("moe", layer.ffn, x, experts.run_async(layer.ffn.layer, x, ids, weights))


def _settle(h: torch.Tensor, pending) -> torch.Tensor:
    """Add a launched FFN's output to the residual stream h [T_i, H]."""
    if pending is None:
        return h
    if pending[0] == "done":
        return h + pending[1]
    _, block, x, handle = pending
    return h + block.finish(x, handle.result())


def split_batch(batch: AttentionBatch, m: int) -> list[tuple[int, int, AttentionBatch]]:
    """Split B sequences into at most m contiguous groups of near-equal size:
    [(first token, end token, the group's AttentionBatch)]."""
    num_seqs = len(batch.query_lens)
    m = max(1, min(m, num_seqs))
    if m == 1:
        return [(0, batch.num_tokens, batch)]
    bounds = [round(i * num_seqs / m) for i in range(m + 1)]
    tables = batch.block_tables.tolist()
    parts, token = [], 0
    for lo, hi in zip(bounds, bounds[1:]):
        q = batch.query_lens[lo:hi]
        trees = None if batch.trees is None else batch.trees[lo:hi]  # draft trees being verified
        mb = AttentionBatch.build(q, batch.context_lens[lo:hi], tables[lo:hi], batch.block_size, trees=trees,
                                  device=batch.device)
        if batch.sequence_tags is not None:
            mb.sequence_tags = batch.sequence_tags[token : token + sum(q)]
        parts.append((token, token + sum(q), mb))
        token += sum(q)
    return parts
