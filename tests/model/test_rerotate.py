"""Re-rotating cached keys to a new position: the rotary part of a key cached at position p and
turned by d equals the key computed at p + d (YaRN's attention scale applied once; MLA's latent
untouched); and for every family, a chunk's first-layer keys computed alone and placed at a new
position equal the first-layer keys a full prefill computes there (layer 0 has no context)."""

import pytest
import torch
from checkpoints import FAMILIES, build_checkpoint

from raymoe.engine.blend import gather_rows, place_chunk
from raymoe.model.model import load_model
from raymoe.model.paged import AttentionBatch, allocate_kv_cache
from raymoe.model.rope import Rotary

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "mscale": 1.0,
        "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}  # fmt: skip


LINEAR = {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("scaling", [{}, LINEAR, YARN], ids=["default", "linear", "yarn"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rerotated_keys_equal_keys_rotated_at_the_new_position(scaling, interleaved):
    rotary = Rotary(16, 10000.0, scaling, 512, interleaved)
    if scaling is YARN:
        assert rotary.scale != 1.0  # the case where scaling twice would show
    x = torch.randn(40, 2, 16, generator=torch.Generator().manual_seed(0))
    old = torch.arange(40)
    delta = torch.randint(0, 400, (40,), generator=torch.Generator().manual_seed(1))
    at_old = rotary.apply(x, *rotary.cos_sin(old, torch.float32))
    at_new = rotary.apply(x, *rotary.cos_sin(old + delta, torch.float32))
    torch.testing.assert_close(rotary.rerotate(at_old, delta), at_new, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(at_old, at_new, atol=1e-3)  # the rotation did move them


def _kv_of(model, tokens: list[int], block_size: int = 8):
    """KV of every position of a plain prefill of `tokens` in a fresh cache."""
    num_blocks = -(-len(tokens) // block_size)
    cache = allocate_kv_cache(model.kv_layout(), num_blocks, block_size, model.dtype)
    table = list(range(num_blocks))
    batch = AttentionBatch.build([len(tokens)], [len(tokens)], [table], block_size)
    model.forward(torch.tensor(tokens), batch, cache)
    return gather_rows(cache, table, block_size, len(tokens))


@pytest.mark.parametrize("family", [*FAMILIES, "deepseek_v3_yarn"])
def test_first_layer_keys_of_a_placed_chunk_equal_keys_computed_there(family, checkpoint_dir, tmp_path):
    if family == "deepseek_v3_yarn":
        path = build_checkpoint("deepseek_v3", tmp_path, rope_scaling={**YARN, "type": "yarn"})
    else:
        path = checkpoint_dir(family)
    model = load_model(path)
    assert (model.rotary.scale != 1.0) == (family == "deepseek_v3_yarn")  # YaRN's attention factor
    chunk = [(7 * i * i + 3) % 250 + 3 for i in range(21)]
    prefix = [(11 * i + 5) % 250 + 3 for i in range(37)]
    alone = _kv_of(model, chunk)
    full = _kv_of(model, prefix + chunk + [4, 5])
    placed = place_chunk(model, alone, slice(0, len(chunk)), len(prefix))
    there = slice(len(prefix), len(prefix) + len(chunk))
    torch.testing.assert_close(placed[0][0], full[0][0][there], atol=2e-5, rtol=1e-4)
    if placed[0][1] is not None:
        torch.testing.assert_close(placed[0][1], full[0][1][there])
    # Deeper layers do depend on the preceding context: placing alone does not reproduce them.
    assert not torch.allclose(placed[1][0], full[1][0][there], atol=1e-3)
