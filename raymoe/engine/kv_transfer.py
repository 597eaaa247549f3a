"""Moving KV blocks between paged caches: one flat tensor per block, and the pool keys of a prompt.

A paged cache (`raymoe.model.paged`) holds, per layer, `k_cache [num_blocks, block_size, kv_heads,
k_dim]` and `v_cache [num_blocks, block_size, kv_heads, v_dim]` (`v_dim` is 0 for MLA, whose one
latent per token sits in the keys). An *exported block* is one block slot's KV across all layers as
one contiguous 1-D tensor of the cache's dtype, in this order:

    layer 0 keys  [block_size, kv_heads_0, k_dim_0] flattened,
    layer 0 values [block_size, kv_heads_0, v_dim_0] flattened,
    layer 1 keys, layer 1 values, ...

so its length is `sum(block_size * kv_heads * (k_dim + v_dim))` over layers, and it can be imported
into any slot of any cache with the same layout (same model, block size and dtype).

Pool keys are strings. A full block is keyed by the engine's prefix hash chain
(`raymoe.engine.block_manager.block_hash`) in hex, so the key names the whole prefix up to the
block's end. A prompt's partial last block is keyed in its own namespace, `partial:<parent>:<digest>`,
so it never matches a full block; further namespaces (e.g. document chunks) take their own prefix.
"""

from __future__ import annotations

import hashlib
from array import array

import torch

from raymoe.engine.block_hash import block_hash
from raymoe.errors import RaymoeError
from raymoe.model.paged import KVCache

PARTIAL_PREFIX = "partial:"
ROOT = "root"  # the parent of a prompt's first block, in partial keys


class KVLayoutError(RaymoeError, ValueError):
    """An exported block does not fit the cache it is imported into."""


def block_numel(kv_cache: KVCache) -> int:
    """Elements in one exported block."""
    return sum(part[0].numel() for layer in kv_cache for part in layer)


def block_nbytes(kv_cache: KVCache) -> int:
    """Bytes of one block slot across all layers (= bytes of one exported block)."""
    return sum(part[0].numel() * part.element_size() for layer in kv_cache for part in layer)


def export_blocks(kv_cache: KVCache, block_ids: list[int]) -> list[torch.Tensor]:
    """The KV of the given block slots, one contiguous 1-D tensor each (layout: module docstring).

    Each tensor owns its storage, so shipping one never drags the others (or the cache) along.
    """
    _check_one_dtype(kv_cache)
    return [torch.cat([part[b].reshape(-1) for layer in kv_cache for part in layer]) for b in block_ids]


def import_blocks(kv_cache: KVCache, block_ids: list[int], blocks: list[torch.Tensor]) -> None:
    """Write exported blocks into the given (distinct) block slots of `kv_cache`; the inverse of
    `export_blocks`. The slots may differ from the ones the blocks were exported from."""
    if len(block_ids) != len(blocks):
        raise KVLayoutError(f"{len(block_ids)} block ids for {len(blocks)} blocks: pass one slot per block")
    if not blocks:
        return
    dtype, numel = _check_one_dtype(kv_cache), block_numel(kv_cache)
    for b in blocks:
        if b.dim() != 1 or b.numel() != numel or b.dtype != dtype:
            raise KVLayoutError(
                f"block of shape {list(b.shape)} and {b.dtype} does not fit a cache whose blocks are "
                f"[{numel}] {dtype}: export and import with the same model, block size and dtype "
                "(bfloat16 read back from the pool needs KVPoolClient(dtype=...))"
            )
    device = kv_cache[0][0].device
    flat = torch.stack(blocks).to(device)  # [n, numel] (host-staged blocks move in one copy)
    ids = torch.tensor(block_ids, dtype=torch.long).to(device)
    offset = 0
    for layer in kv_cache:
        for part in layer:
            size = part[0].numel()
            if size:  # an MLA value cache has no elements
                part.index_copy_(0, ids, flat[:, offset : offset + size].view(len(blocks), *part.shape[1:]))
            offset += size


def block_key(hash_: int) -> str:
    """Pool key of a full block from its hash-chain value (as the BlockManager computes it)."""
    return f"{hash_:016x}"


def prompt_block_keys(token_ids: list[int], block_size: int) -> list[str]:
    """Pool keys of every block of a token sequence, in order: full blocks by hash chain, then the
    partial last block (if any) under `partial:<parent key or root>:<digest of its tokens>`."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    keys, parent = [], None
    num_full = len(token_ids) // block_size
    for i in range(num_full):
        parent = block_hash(parent, list(token_ids[i * block_size : (i + 1) * block_size]))
        keys.append(block_key(parent))
    tail = token_ids[num_full * block_size :]
    if tail:
        digest = hashlib.blake2b(array("q", tail).tobytes(), digest_size=8).hexdigest()
        keys.append(f"{PARTIAL_PREFIX}{ROOT if parent is None else block_key(parent)}:{digest}")
    return keys


def _check_one_dtype(kv_cache: KVCache) -> torch.dtype:
    dtypes = {part.dtype for layer in kv_cache for part in layer}
    assert len(dtypes) == 1, f"a paged cache has one dtype, found {dtypes}"
    return dtypes.pop()
