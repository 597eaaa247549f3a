"""KV blocks exported from one paged cache and imported into another, at other slots, give the
model exactly the same next-token logits; pool keys of a prompt follow the engine's hash chain."""

import pytest
import torch

from raymoe.engine.kv_transfer import (
    KVLayoutError,
    block_key,
    block_nbytes,
    export_blocks,
    import_blocks,
    prompt_block_keys,
)
from raymoe.engine.block_manager import block_hash
from raymoe.model.model import load_model
from raymoe.model.paged import AttentionBatch, allocate_kv_cache

BLOCK_SIZE = 4


def _step(model, cache, token_ids, num_cached, block_table):
    """Run `token_ids` after `num_cached` cached tokens; logits of the last one [V]."""
    batch = AttentionBatch.build([len(token_ids)], [num_cached + len(token_ids)], [block_table], BLOCK_SIZE)
    hidden = model.forward(torch.tensor(token_ids), batch, cache)
    return model.compute_logits(hidden[-1:])[0]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_imported_blocks_give_identical_next_token_logits(checkpoint_dir, family):
    model = load_model(checkpoint_dir(family))
    prompt = [(7 * j) % 200 + 3 for j in range(10)]  # 2 full blocks + a partial one of 2 tokens
    src = allocate_kv_cache(model.kv_layout(), 4, BLOCK_SIZE, torch.float32)
    first = int(_step(model, src, prompt, 0, [1, 2, 3]).argmax())

    dst = allocate_kv_cache(model.kv_layout(), 8, BLOCK_SIZE, torch.float32)
    import_blocks(dst, [7, 0, 5], export_blocks(src, [1, 2, 3]))

    expected = _step(model, src, [first], len(prompt), [1, 2, 3])
    got = _step(model, dst, [first], len(prompt), [7, 0, 5])
    assert torch.equal(got, expected)
    empty = allocate_kv_cache(model.kv_layout(), 8, BLOCK_SIZE, torch.float32)
    assert not torch.equal(_step(model, empty, [first], len(prompt), [7, 0, 5]), expected)  # the KV mattered


def _filled_cache(layout, num_blocks, dtype=torch.float32):
    cache = allocate_kv_cache(layout, num_blocks, BLOCK_SIZE, dtype)
    for i, (k, v) in enumerate(cache):
        k.copy_(torch.randn(k.shape, generator=torch.Generator().manual_seed(2 * i)))
        v.copy_(torch.randn(v.shape, generator=torch.Generator().manual_seed(2 * i + 1)))
    return cache


@pytest.mark.parametrize(
    "layout",
    [pytest.param([(2, 3, 3), (1, 5, 5)], id="gqa"), pytest.param([(1, 6, 0), (1, 6, 0)], id="mla_no_values")],
)
def test_exported_block_layout_is_layers_keys_then_values(layout):
    cache = _filled_cache(layout, 3)
    (block,) = export_blocks(cache, [2])
    expected = torch.cat([part[2].reshape(-1) for layer in cache for part in layer])
    assert block.dim() == 1 and block.is_contiguous() and torch.equal(block, expected)
    assert block.numel() * block.element_size() == block_nbytes(cache)
    assert block_nbytes(cache) == sum(BLOCK_SIZE * h * (k + v) * 4 for h, k, v in layout)


def test_export_import_round_trip_bfloat16_leaves_other_slots_alone():
    layout = [(2, 3, 3), (2, 3, 3)]
    src = _filled_cache(layout, 3, torch.bfloat16)
    blocks = export_blocks(src, [0, 2])
    assert blocks[0].untyped_storage().data_ptr() != blocks[1].untyped_storage().data_ptr()  # own storage each
    dst = allocate_kv_cache(layout, 5, BLOCK_SIZE, torch.bfloat16)
    import_blocks(dst, [4, 1], blocks)
    for (sk, sv), (dk, dv) in zip(src, dst):
        assert torch.equal(dk[4], sk[0]) and torch.equal(dv[1], sv[2])
        assert not dk[[0, 2, 3]].any() and not dv[[0, 2, 3]].any()


def test_import_rejects_blocks_of_another_layout():
    cache = allocate_kv_cache([(2, 3, 3)], 2, BLOCK_SIZE, torch.float32)
    with pytest.raises(KVLayoutError, match="same model"):
        import_blocks(cache, [0], [torch.zeros(5)])
    with pytest.raises(KVLayoutError, match="same model"):
        import_blocks(cache, [0], [torch.zeros(48, dtype=torch.int32)])
    with pytest.raises(KVLayoutError, match="one slot per block"):
        import_blocks(cache, [0, 1], [torch.zeros(48)])


def test_prompt_block_keys_follow_the_engine_hash_chain():
    tokens = list(range(10, 20))  # 2 full blocks of 4, a tail of 2
    h0 = block_hash(None, tokens[0:4])
    h1 = block_hash(h0, tokens[4:8])
    keys = prompt_block_keys(tokens, BLOCK_SIZE)
    assert keys[:2] == [block_key(h0), block_key(h1)]
    assert keys[2].startswith(f"partial:{block_key(h1)}:")
    assert len(keys) == 3


def test_prompt_block_keys_share_prefixes_and_separate_tails():
    base = prompt_block_keys(list(range(10)), BLOCK_SIZE)
    other_tail = prompt_block_keys(list(range(8)) + [99, 98], BLOCK_SIZE)
    longer = prompt_block_keys(list(range(12)), BLOCK_SIZE)
    assert other_tail[:2] == base[:2] and other_tail[2] != base[2]
    assert longer[:2] == base[:2] and not longer[2].startswith("partial:")  # a full block, not the tail
    assert prompt_block_keys(list(range(8)), BLOCK_SIZE) == base[:2]  # no tail, no partial key
    assert prompt_block_keys([5, 6], BLOCK_SIZE)[0].startswith("partial:root:")
    assert prompt_block_keys([], BLOCK_SIZE) == []
    # a tail is not confused with a shorter tail that is its prefix
    assert prompt_block_keys([5], BLOCK_SIZE) != prompt_block_keys([5, 6], BLOCK_SIZE)
