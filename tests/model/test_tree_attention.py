"""Tree attention over the paged KV (speculative decoding's verification step): each node of a
draft tree, laid out in slot order after the context, gets the logits of its own path run as plain
tokens; after the accepted path's KV moves behind the root (`move_kv`), the next decode step gets
the logits plain decoding gets."""

import pytest
import torch

from raymoe.model.model import load_model
from raymoe.model.paged import AttentionBatch, allocate_kv_cache, move_kv

BS = 4
PROMPT = [(7 * j * j + 3) % 250 + 3 for j in range(10)]  # the context; its last token is the root
TREE_TOKENS = [PROMPT[-1], 17, 23, 40, 41, 99]  # the root, then the draft
PARENTS = [-1, 0, 0, 1, 1, 3]  # root -> {17 -> {40 -> 99, 41}, 23}


def plain_logits(model, tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), V] of a plain prefill in a fresh cache."""
    cache = allocate_kv_cache(model.kv_layout(), 8, BS, model.dtype)
    batch = AttentionBatch.build([len(tokens)], [len(tokens)], [list(range(8))], BS)
    return model.compute_logits(model.forward(torch.tensor(tokens), batch, cache))


def path_of(node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = PARENTS[node]
    return path[::-1]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])  # grouped-query and latent attention
def test_tree_rows_and_moved_path_equal_plain_tokens(family, checkpoint_dir):
    model = load_model(checkpoint_dir(family))
    cache, table, n = allocate_kv_cache(model.kv_layout(), 8, BS, model.dtype), [list(range(8))], len(PROMPT) - 1
    model.forward(torch.tensor(PROMPT[:-1]), AttentionBatch.build([n], [n], table, BS), cache)
    tree = AttentionBatch.build([len(PARENTS)], [n + len(PARENTS)], table, BS, trees=[PARENTS])
    assert tree.positions.tolist() == [n, n + 1, n + 1, n + 2, n + 2, n + 3]
    logits = model.compute_logits(model.forward(torch.tensor(TREE_TOKENS), tree, cache))  # [6, V]
    for node in range(len(PARENTS)):
        tokens = PROMPT[:-1] + [TREE_TOKENS[i] for i in path_of(node)]
        torch.testing.assert_close(logits[node], plain_logits(model, tokens)[-1], atol=1e-4, rtol=1e-4)
    accepted = path_of(5)[1:]  # nodes 1, 3, 5: tokens 17, 40, 99 go to slots n + 1 .. n + 3
    move_kv(cache, tree.slot_mapping[accepted], tree.slot_mapping[1 : 1 + len(accepted)])
    m = n + 1 + len(accepted)
    step = AttentionBatch.build([1], [m + 1], table, BS)
    got = model.compute_logits(model.forward(torch.tensor([7]), step, cache))[0]
    expected = plain_logits(model, PROMPT + [17, 40, 99, 7])[-1]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
