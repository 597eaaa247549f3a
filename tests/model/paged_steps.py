"""One engine step's attention inputs for the attention tests: a filled paged pool, the step's
`AttentionBatch` (each sequence on shuffled blocks), and q, k, v."""

from __future__ import annotations

import torch

from raymoe.model import paged


def filled_step(query_lens, context_lens, heads, kv_heads, d, block_size, dtype=torch.float32, seed=0):
    """-> ((k_cache, v_cache), batch, q [T, heads, d], k, v [T, kv_heads, d]); this step's k and v are
    written into the pool; q is a view with a row stride wider than heads * d, as the attention layer
    passes it."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 1
    cache = tuple(torch.randn(num_blocks, block_size, kv_heads, d, generator=gen).to(dtype) for _ in range(2))
    perm, tables, at = torch.randperm(num_blocks, generator=gen).tolist(), [], 0
    for c in context_lens:
        tables.append(perm[at : at + -(-c // block_size)])
        at += len(tables[-1])
    batch = paged.AttentionBatch.build(query_lens, context_lens, tables, block_size)
    t = sum(query_lens)
    qk = torch.randn(t, heads + kv_heads, d, generator=gen).to(dtype)
    q, k = qk[:, :heads], qk[:, heads:]
    v = torch.randn(t, kv_heads, d, generator=gen).to(dtype)
    paged.write_kv(cache, batch, k, v)
    return cache, batch, q, k, v
