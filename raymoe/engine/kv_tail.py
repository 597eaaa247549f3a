"""A sequence's partial last KV block, moved with it between engines (re-seating stays exact and
recomputes nothing).

Full blocks move by content key through a KV pool (`LLMEngine.export_prefix` / `import_prefix`).
The tokens past a sequence's last full block (at most block_size - 1 of them) would be recomputed by
the engine that resumes it. `export_tail` takes their KV as one exported block (the
`raymoe.engine.kv_transfer` layout) under the pool key of that partial block (`tail_key`); the
resuming engine keeps it on the waiting sequence (`Sequence.kv_tail`, set by
`LLMEngine.set_kv_tail`), and `adopt_tails` writes it into the sequence's own block once the
scheduler has given it blocks and its full blocks came from the prefix cache: the sequence then
computes its last token only, as it would have on the engine it left. When its full blocks did not
all hit (evicted meanwhile), the tail is dropped and recomputed as before.
"""

from __future__ import annotations

import torch

from raymoe.engine.kv_transfer import export_blocks, import_blocks, prompt_block_keys


def tail_span(num_tokens: int, block_size: int) -> tuple[int, int]:
    """(first token, tokens) of the partial block a sequence of `num_tokens` tokens at rest has
    computed: every token but its last, past the last full block that a prefix hit may cover."""
    start = (num_tokens - 1) // block_size * block_size
    return start, num_tokens - 1 - start


def tail_key(token_ids: list[int], block_size: int) -> str | None:
    """Pool key of a sequence's computed partial block (None: it has none)."""
    start, n = tail_span(len(token_ids), block_size)
    return prompt_block_keys(list(token_ids[: start + n]), block_size)[-1] if n else None


def export_tail(seq, kv_cache, block_size: int) -> tuple[str, torch.Tensor] | None:
    """(pool key, exported block) of a sequence at rest's partial block; None when it has none or
    its KV is not all computed (it was mid-prefill)."""
    start, n = tail_span(len(seq.token_ids), block_size)
    if not n or seq.num_cached_tokens != start + n:
        return None
    return tail_key(seq.token_ids, block_size), export_blocks(kv_cache, [seq.block_table[start // block_size]])[0]


def adopt_tails(scheduled: list, kv_cache, block_size: int) -> list:
    """Write each newly admitted sequence's `kv_tail` into its own block; returns the schedule with
    those sequences' new-token counts cut to what is left to compute (one token)."""
    out = []
    for seq, n in scheduled:
        if seq.kv_tail is not None:
            tail, seq.kv_tail = seq.kv_tail, None
            start, count = tail_span(len(seq.token_ids), block_size)
            if seq.num_cached_tokens == start and count == tail[0]:  # the full blocks hit: fill the rest
                import_blocks(kv_cache, [seq.block_table[start // block_size]], [tail[1]])
                seq.num_cached_tokens += count
                n = min(n, seq.num_uncomputed_tokens)
        out.append((seq, n))
    return out
