"""Microbatch pipelining reorders work only: logits equal the plain forward for m = 1, 2, 4."""

import pytest
import torch

from raymoe.cluster.pipeline import PipelinedModel, split_batch
from raymoe.model.model import load_model
from raymoe.model.paged import AttentionBatch, allocate_kv_cache


def _step(model, lens, ctx):
    cache = allocate_kv_cache(model.kv_layout(), 40, 8, torch.float32)
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(len(lens))]
    gen = torch.Generator().manual_seed(3)
    # fill every context with a first forward, then run the step under test
    first = AttentionBatch.build([c - q for q, c in zip(lens, ctx)], [c - q for q, c in zip(lens, ctx)], tables, 8)
    model.forward(torch.randint(3, 250, (first.num_tokens,), generator=gen), first, cache)
    batch = AttentionBatch.build(lens, ctx, tables, 8)
    return model.compute_logits(model.forward(torch.randint(3, 250, (batch.num_tokens,), generator=gen), batch, cache))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("m", [2, 3, 4])
def test_pipelined_forward_equals_plain(family, m, checkpoint_dir):
    model = load_model(checkpoint_dir(family))
    lens, ctx = [1, 1, 3, 1, 2], [9, 20, 14, 5, 30]
    expected = _step(model, lens, ctx)
    got = _step(PipelinedModel(model, m), lens, ctx)
    assert (got - expected).abs().max().item() <= 1e-5


def test_split_batch_covers_every_token_once():
    batch = AttentionBatch.build([1, 4, 1, 2, 1], [5, 8, 3, 9, 2], [[0], [1], [2], [3, 4], [5]], 8)
    parts = split_batch(batch, 2)
    assert [(a, b) for a, b, _ in parts] == [(0, 5), (5, 9)]
    assert [p.query_lens for _, _, p in parts] == [[1, 4], [1, 2, 1]]
    assert len(split_batch(batch, 9)) == 5


def test_microbatches_keep_draft_trees():
    """A verification step (one sequence's draft tree beside plain decodes) split in microbatches:
    each keeps its sequences' trees and positions."""
    batch = AttentionBatch.build([1, 4, 1], [5, 8, 3], [[0], [1], [2]], 8, trees=[None, [-1, 0, 0, 1], None])
    parts = split_batch(batch, 2)
    assert [p.trees for _, _, p in parts] == [[None, [-1, 0, 0, 1]], None]
    assert torch.equal(torch.cat([p.positions for _, _, p in parts]), batch.positions)
    assert batch.positions.tolist() == [4, 4, 5, 5, 6, 2]  # the tree's nodes at the root's position + depth
