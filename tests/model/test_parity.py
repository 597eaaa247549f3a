"""raymoe's forward matches transformers' on every family (float32, max abs diff <= 1e-4)."""

import pytest
import torch

from checkpoints import FAMILIES, load_reference
from raymoe.model.model import load_model
from raymoe.model.paged import AttentionBatch, allocate_kv_cache

BLOCK = 4


def _run_chunks(model, token_ids: list[int], chunks: list[int]) -> torch.Tensor:
    """Feed one sequence in chunks through the paged cache; logits of every position [L, V]."""
    num_blocks = (len(token_ids) + BLOCK - 1) // BLOCK + 1
    cache = allocate_kv_cache(model.kv_layout(), num_blocks + 2, BLOCK, torch.float32)
    table = list(range(2, 2 + num_blocks))  # not starting at block 0: slot arithmetic must be right
    out, done = [], 0
    for n in chunks:
        batch = AttentionBatch.build([n], [done + n], [table], BLOCK)
        hidden = model.forward(torch.tensor(token_ids[done : done + n]), batch, cache)
        out.append(model.compute_logits(hidden))
        done += n
    return torch.cat(out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, checkpoint_dir):
    path = checkpoint_dir(family)
    ids = torch.randint(3, 256, (21,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = load_reference(path)(torch.tensor([ids])).logits[0]
    model = load_model(path)
    for chunks in ([21], [5, 7, 1, 1, 7], [1] * 21):
        got = _run_chunks(model, ids, chunks)
        diff = (got - expected).abs().max().item()
        assert diff <= 1e-4, f"{family} chunks={chunks}: max abs diff {diff}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_sequences_match_alone(family, checkpoint_dir):
    """Three sequences of different lengths in one step give the logits each gives alone."""
    model = load_model(checkpoint_dir(family))
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (9, 3, 14)]
    alone = [_run_chunks(model, s, [len(s)])[-1] for s in seqs]
    cache = allocate_kv_cache(model.kv_layout(), 16, BLOCK, torch.float32)
    tables = [[0, 1, 2], [3], [4, 5, 6, 7]]
    batch = AttentionBatch.build([9, 3, 14], [9, 3, 14], tables, BLOCK)
    hidden = model.forward(torch.tensor(sum(seqs, [])), batch, cache)
    last = torch.tensor([8, 11, 25])
    got = model.compute_logits(hidden[last])
    assert (got - torch.stack(alone)).abs().max().item() <= 1e-4
