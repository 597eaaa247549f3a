"""The unpadded attention (`raymoe.model.ragged`) gives the padded path's outputs on steps that mix
decodes of many context lengths with prompt chunks with and without a cached prefix, with GQA and a
sliding window, its decodes (and the prompt rows of short contexts) through torch's SDPA in groups by
context length and through raymoe's C kernel (tests/model/test_native.py)."""

import pytest
import torch

from raymoe.model import paged, ragged
from tests.model.native_kernels import need_kernel
from tests.model.paged_steps import filled_step

BS, KV_HEADS, HEADS, D = 4, 2, 4, 8


def _step(query_lens, context_lens):
    """A filled pool, the step's batch (each sequence on its own shuffled blocks), q, k, v."""
    return filled_step(query_lens, context_lens, HEADS, KV_HEADS, D, BS, seed=sum(context_lens))


def _plan(batch, kernel: bool):
    """The step's plan with its decodes through raymoe's C kernel, or through torch's SDPA."""
    plan = ragged.build_plan(batch.query_lens, batch.context_lens, batch.block_tables, BS)
    if kernel:
        need_kernel()
    if not kernel:
        plan.native, plan.prefill_kernel = None, False
    return plan


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(
    "query_lens,context_lens",
    [
        pytest.param([1] * 6, [3, 40, 9, 17, 1, 33], id="decodes"),
        pytest.param([1, 1, 7, 1, 12, 5], [30, 2, 7, 14, 20, 5], id="mixed"),  # prefixes: 8 cached before 12
        pytest.param([9], [9], id="prompt"),
    ],
)
@pytest.mark.parametrize("kernel", [False, True], ids=["sdpa", "kernel"])
def test_ragged_equals_padded(query_lens, context_lens, window, kernel):
    cache, batch, q, k, v = _step(query_lens, context_lens)
    ctx = [paged.gather_context(part, batch) for part in cache]
    want = paged.attend(q, *ctx, batch, 0.3, window)
    plan = _plan(batch, kernel)
    got = ragged.attend_ragged(q, k, v, cache, plan, 0.3, window)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_prompt_rows_in_the_kernel_up_to_their_context_limit(monkeypatch, window):
    """Prompt rows that see at most the limit's keys run in the C kernel, a chunk's later rows in SDPA:
    the padded path's outputs; a row in the kernel has the same bits wherever its chunk is cut."""
    need_kernel()
    cache, batch, q, k, v = _step([1, 7, 12], [30, 7, 20])  # a decode; a whole prompt; 12 new after 8 cached
    want = paged.attend(q, *[paged.gather_context(part, batch) for part in cache], batch, 0.3, window)
    key_bytes = KV_HEADS * 2 * D * 4
    got = {}
    for max_keys in (10, 20):
        monkeypatch.setattr(ragged, "PREFILL_KERNEL_BYTES", max_keys * key_bytes)
        plan = ragged.build_plan(batch.query_lens, batch.context_lens, batch.block_tables, BS)
        got[max_keys] = ragged.attend_ragged(q, k, v, cache, plan, 0.3, window)
        torch.testing.assert_close(got[max_keys], want, atol=1e-6, rtol=1e-5)
    assert plan.prefill_rows(10)[1] == [8, 10]  # the whole prompt's 7 rows; positions 8 and 9 of the other
    assert plan.prefill_rows(20)[1] == [8, 20]
    assert torch.equal(got[10][:10], got[20][:10])


def test_decodes_split_where_padding_costs_more_than_a_group():
    short, long_ = [4] * 8, [400] * 8
    groups = ragged.split_groups(list(range(16)), short + long_, 16)
    assert groups == [list(range(8)), list(range(8, 16))]
    assert ragged.split_groups(list(range(4)), [30, 31, 40, 44], 16) == [[0, 1, 2, 3]]  # close: one group


def test_trees_and_explicit_positions_keep_the_padded_path():
    tree = paged.AttentionBatch.build([3], [8], [[0, 1]], BS, trees=[[-1, 0, 0]])
    explicit = paged.AttentionBatch.build([2], [8], [[0, 1]], BS, positions=[[2, 6]])
    assert ragged.plan_for(tree) is None and ragged.plan_for(explicit) is None


@pytest.mark.parametrize("window", [None, 5])
def test_decode_groups_in_pieces_give_the_same_bits(monkeypatch, window):
    """A group gathered and attended a few members at a time equals it done whole, bit for bit."""
    cache, batch, q, k, v = _step([1] * 7 + [5], [30, 28, 31, 29, 27, 32, 26, 9])
    whole = ragged.attend_ragged(q, k, v, cache, _plan(batch, False), 0.3, window)
    block_bytes = cache[0][0].nbytes + cache[1][0].nbytes
    monkeypatch.setattr(ragged, "GATHER_BYTES", 2 * 8 * block_bytes)  # two members of 8 blocks a piece
    plan = _plan(batch, False)
    assert [len(g.pieces(block_bytes)) for g in plan.decodes] == [4]
    assert torch.equal(ragged.attend_ragged(q, k, v, cache, plan, 0.3, window), whole)


def test_group_members_in_row_order_make_slices():
    """Decodes scheduled longest first (the running order) still index their rows by slices."""
    cache, batch, q, k, v = _step([1] * 4, [31, 30, 29, 28])
    plan = ragged.plan_for(batch)
    assert [g.rows for g in plan.decodes] == [slice(0, 4)]
    assert plan.decodes[0].rows_of(slice(1, 3)) == slice(1, 3)
