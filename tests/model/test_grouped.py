"""The grouped expert path (`torch._grouped_mm` on CPU) equals the per-expert loop bit for bit."""

import pytest
import torch

from raymoe.model.experts import ExpertStore, LayerExperts, group_tokens
from raymoe.model.grouped import can_group
from raymoe.model.layers import SwiGLU


def _layer(num_experts: int, hidden: int, inter: int) -> LayerExperts:
    gen = torch.Generator().manual_seed(0)
    experts = {
        e: SwiGLU(torch.randn(2 * inter, hidden, generator=gen) * 0.05, torch.randn(hidden, inter, generator=gen) * 0.05)
        for e in range(num_experts)
    }
    return LayerExperts.stack(experts)


@pytest.mark.parametrize("num_tokens", [1, 3, 32, 200])
def test_grouped_equals_per_expert_loop(num_tokens):
    held = _layer(16, 64, 48)
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, 64, generator=gen)
    ids = torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(num_tokens)])  # [T, 4]
    groups = group_tokens(ids, torch.full((num_tokens, 4), 0.25), 16)
    rows = x[groups.token_of_row]
    assert can_group(rows, held.gate_up_t, held.down_t)
    want = torch.cat([held.run_one(e, rows[a:b]) for e, a, b in groups.expert_ranges()])
    got = ExpertStore({0: held}).run_groups(0, rows, groups)
    assert torch.equal(got, want)


def test_grouped_over_a_span_of_held_experts():
    """A shard's stack may cover experts 4..9 with rows for some of them only (views of its file)."""
    full = _layer(16, 64, 48)
    span = LayerExperts(list(range(4, 10)), full.gate_up_t[4:10], full.down_t[4:10])
    rows = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[5], [5], [8], [9], [9]])
    groups = group_tokens(ids, torch.ones(5, 1), 16)
    want = torch.cat([full.run_one(5, rows[:2]), full.run_one(8, rows[2:3]), full.run_one(9, rows[3:])])
    assert torch.equal(ExpertStore({0: span}).run_groups(0, rows, groups), want)


def test_unaligned_or_non_cpu_tensors_take_the_fallback():
    rows = torch.randn(4, 6, dtype=torch.bfloat16)  # 12-byte rows: the grouped kernel refuses them
    assert not can_group(rows, torch.randn(2, 6, 8, dtype=torch.bfloat16))
    assert can_group(torch.randn(4, 8), torch.randn(2, 8, 16))
