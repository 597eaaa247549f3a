"""Content hashes of full KV blocks, chained so a block's hash names its whole prefix, and the salts
that put chunk-reuse blocks in a namespace of their own (`raymoe.engine.chunks`).

The bottom of the engine's imports: `chunks` (and so `sampling_params`, `sequence`) and
`block_manager` use it; it uses nothing of raymoe.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import NamedTuple


def block_hash(parent: int | None, token_ids: list[int]) -> int:
    """Content hash of a full block, chained to its parent's; stable across processes."""
    h = hashlib.blake2b(digest_size=8)
    if parent is not None:
        h.update(parent.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


SALT_MARK = -0x5A17  # the first token of a salt's pseudo-block (no real block has a negative id)


class CacheSalt(NamedTuple):
    """A separate hash namespace from block `start_block` on: blocks whose KV is not the exact
    prefix KV of their tokens (chunk-cache reuse) are shared only with requests of the same salt."""

    value: int  # in [0, 2**62)
    start_block: int


def chain_parent(parent: int | None, i: int, salt: CacheSalt | None) -> int | None:
    """The parent hash block i chains to: `parent`, or at the salt's first block `parent` mixed with it."""
    if salt is None or i != salt.start_block:
        return parent
    return block_hash(parent, [SALT_MARK, salt.value])
