"""Chunk-cache reuse (CacheBlend, Cache-Craft): the request option, where chunks sit in a prompt,
their cache keys and salt, the chunk KV format, and the choice of tokens to recompute.

A request names reusable spans of its prompt (`ChunkReuse.chunks`, token ids; e.g. RAG documents).
Each chunk's KV is computed once on its own (positions 0..n-1, no context) and stored under
`chunk_key(tokens)`. A later prompt that holds the chunk anywhere takes that KV, turns the rotary
keys to the chunk's new positions, and recomputes a share of its tokens with the full preceding
context (`select_recompute`); see `raymoe.engine.blend` for the forward pass and docs/chunks.md.

The KV so assembled is not the prompt's exact prefix KV, so its blocks hash under a `CacheSalt`
(`plan_blend`): exact prefix caching never serves them to a plain request. Pure python + torch
tensors; no model here.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from dataclasses import dataclass
from typing import Protocol

import torch

from raymoe.engine.block_hash import CacheSalt
from raymoe.errors import InvalidRequestError

CHUNK_PREFIX = "chunk:"  # pool key namespace of chunk entries
DEFAULT_SHARE = 0.15  # CacheBlend's recommended recompute ratio is 10-20%
ADAPTIVE_MAX_SHARE = 0.5
BLEND_VERSION = 1  # bump when the blend's arithmetic changes: old salted blocks stop matching


@dataclass(frozen=True)
class ChunkReuse:
    """Per-request option: reuse the cached KV of these token spans wherever they sit in the prompt.

    chunks: token-id spans, each a contiguous sub-span of the prompt, in prompt order, not
    overlapping. recompute_share: the share of chunk tokens recomputed with full context, in [0, 1]
    (1 = full prefill); None = adaptive (the tokens whose KV deviates far more than the rest)."""

    chunks: tuple[tuple[int, ...], ...]
    recompute_share: float | None = DEFAULT_SHARE

    def __post_init__(self):
        chunks = self.chunks
        if isinstance(chunks, (str, bytes)) or not isinstance(chunks, (list, tuple)) or not chunks:
            raise InvalidRequestError(f"chunks must be a non-empty list of token-id lists, got {chunks!r:.80}")
        norm = []
        for i, c in enumerate(chunks):
            if not isinstance(c, (list, tuple)) or not c or not all(_is_token(t) for t in c):
                raise InvalidRequestError(f"chunk {i} must be a non-empty list of token ids (integers >= 0)")
            norm.append(tuple(c))
        object.__setattr__(self, "chunks", tuple(norm))
        share = self.recompute_share
        if share is not None:
            ok = (isinstance(share, (int, float)) and not isinstance(share, bool)) and 0 <= share <= 1
            if not ok:
                raise InvalidRequestError(f"recompute_share must be in [0, 1] or None (adaptive), got {share!r}")
            object.__setattr__(self, "recompute_share", float(share))


def _is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def chunk_key(tokens) -> str:
    """Pool key of a chunk's KV: the digest of its token ids (the same at any position)."""
    return CHUNK_PREFIX + hashlib.blake2b(array("q", tokens).tobytes(), digest_size=16).hexdigest()


def locate_chunks(prompt: list[int], chunks) -> list[tuple[int, int]]:
    """(start, end) of each chunk in the prompt: the first match after the previous chunk's end.
    Raises InvalidRequestError for a chunk that is not a sub-span there."""
    haystack, spans, at = array("q", prompt).tobytes(), [], 0
    for i, chunk in enumerate(chunks):
        needle, found = array("q", chunk).tobytes(), -1
        pos = haystack.find(needle, at * 8)
        while pos >= 0:  # a match must start on a token boundary
            if pos % 8 == 0:
                found = pos // 8
                break
            pos = haystack.find(needle, pos + 1)
        if found < 0:
            raise InvalidRequestError(
                f"chunk {i} ({len(chunk)} tokens) is not a sub-span of the prompt after token {at}: chunks "
                "must appear in the prompt, in the order given, without overlapping"
            )
        spans.append((found, found + len(chunk)))
        at = found + len(chunk)
    return spans


@dataclass(frozen=True)
class BlendPlan:
    """Where a request's cached chunks go. Positions [0, end) are assembled by the blend (chunks
    from the cache, the tokens between them computed); [end, prompt) is plain prefill. `end` is
    a block boundary, so every block of blended KV is a full block a decode worker can import."""

    spans: tuple[tuple[int, int], ...]  # (start, end) of each placed chunk, clipped to `end`
    keys: tuple[str, ...]  # chunk_key of each whole chunk
    lengths: tuple[int, ...]  # tokens of each whole chunk
    end: int
    share: float | None
    salt: CacheSalt | None  # None when every placed chunk sits at position 0 (exact prefix KV)


def plan_blend(prompt: list[int], reuse: ChunkReuse, block_size: int) -> BlendPlan | None:
    """The blend plan of a prompt (None: no chunk lies before the last full block)."""
    spans = locate_chunks(prompt, reuse.chunks)
    end = (min(spans[-1][1], len(prompt) - 1) // block_size) * block_size
    placed = [(i, s, min(e, end)) for i, (s, e) in enumerate(spans) if s < end]
    if not placed:
        return None
    moved = [s for _, s, _ in placed if s > 0]
    salt = None
    if moved:
        desc = repr((BLEND_VERSION, reuse.recompute_share, [(s, e) for _, s, e in placed])).encode()
        value = int.from_bytes(hashlib.blake2b(desc, digest_size=8).digest(), "little") >> 2
        salt = CacheSalt(value, moved[0] // block_size)
    return BlendPlan(
        spans=tuple((s, e) for _, s, e in placed),
        keys=tuple(chunk_key(reuse.chunks[i]) for i, _, _ in placed),
        lengths=tuple(len(reuse.chunks[i]) for i, _, _ in placed),
        end=end,
        share=reuse.recompute_share,
        salt=salt,
    )


def request_salt(prompt: list[int], reuse: ChunkReuse | None, block_size: int) -> CacheSalt | None:
    """The salt a request's blocks hash under (None: plain prefix hashing)."""
    plan = plan_blend(prompt, reuse, block_size) if reuse is not None else None
    return plan.salt if plan is not None else None


# ----- the stored KV of one chunk ----------------------------------------------------------------
ChunkKV = list[tuple[torch.Tensor, torch.Tensor | None]]  # per layer: keys [n, h, k_dim], values [n, h, v_dim]


def pack_chunk_kv(kv: ChunkKV) -> torch.Tensor:
    """Per-layer KV of n tokens -> one contiguous 1-D tensor: layer 0 keys, layer 0 values, layer 1..."""
    parts = [t.reshape(-1) for k, v in kv for t in (k, v) if t is not None]
    return torch.cat(parts).contiguous()


def unpack_chunk_kv(flat: torch.Tensor, num_tokens: int, kv_layout: list[tuple[int, int, int]]) -> ChunkKV:
    """The inverse of `pack_chunk_kv`; kv_layout per layer (kv_heads, k_dim, v_dim), v_dim 0 = no values."""
    need = sum(num_tokens * h * (k + v) for h, k, v in kv_layout)
    if flat.dim() != 1 or flat.numel() != need:
        raise InvalidRequestError(
            f"a cached chunk of {flat.numel()} elements does not fit {num_tokens} tokens of this model "
            f"({need}): the pool holds KV of another model or dtype"
        )
    out, at = [], 0
    for h, k_dim, v_dim in kv_layout:
        k = flat[at : at + num_tokens * h * k_dim].view(num_tokens, h, k_dim)
        at += k.numel()
        v = None
        if v_dim:
            v = flat[at : at + num_tokens * h * v_dim].view(num_tokens, h, v_dim)
            at += v.numel()
        out.append((k, v))
    return out


class ChunkStore(Protocol):
    """Where chunk KV lives: the node's KV pool (`KVPoolClient`) or an in-process `LocalChunkStore`."""

    def get_chunks(self, keys: list[str]) -> list[torch.Tensor | None]:
        """Packed chunk KV by key, None for a miss."""

    def put_chunks(self, keys: list[str], values: list[torch.Tensor], num_tokens: list[int]) -> None:
        """Store packed chunk KV; num_tokens: each chunk's length (the compute a hit can save)."""

    def credit_chunks(self, keys: list[str], saved_tokens: list[int]) -> None:
        """Record the prefill tokens each hit saved (statistics and reuse score)."""


# ----- which chunk tokens to recompute -----------------------------------------------------------
def kv_deviation(fresh_k, fresh_v, cached_k, cached_v) -> torch.Tensor:
    """Per token squared distance of KV rows: fresh / cached keys [N, h, k_dim], values [N, h, v_dim]
    (or None: MLA) -> [N] float32."""
    dev = (fresh_k.float() - cached_k.float()).pow(2).sum(dim=(1, 2))
    if fresh_v is not None:
        dev = dev + (fresh_v.float() - cached_v.float()).pow(2).sum(dim=(1, 2))
    return dev


def select_recompute(deviation: torch.Tensor, share: float | None) -> torch.Tensor:
    """Indices (ascending) of the chunk tokens to recompute: deviation [N] -> [k] long.

    share in [0, 1]: the ceil(share * N) tokens of largest deviation (CacheBlend's top share).
    share None (adaptive): the tokens whose deviation is above mean + one standard deviation, at
    most ADAPTIVE_MAX_SHARE of them: many when context changes a chunk a lot, few otherwise."""
    n = deviation.numel()
    if share is None:
        if n < 2:
            return torch.arange(n, device=deviation.device)
        mask = deviation > deviation.mean() + deviation.std()
        k = min(int(mask.sum()), math.ceil(ADAPTIVE_MAX_SHARE * n))
    else:
        k = min(n, math.ceil(share * n - 1e-9))
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=deviation.device)
    return torch.topk(deviation, k).indices.sort().values


# ----- prompts given as parts --------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """A reusable part of a prompt (a document): `[instructions, Chunk(doc1), Chunk(doc2), question]`."""

    text: str


def build_prompt(encode, parts: list, share: float | None = DEFAULT_SHARE) -> tuple[list[int], ChunkReuse | None]:
    """Token ids of a prompt given as parts (str, Chunk, or token-id lists), each tokenized alone so a
    chunk has the same tokens wherever it sits, and the ChunkReuse of its Chunk parts (None: none).

    encode(text, add_special_tokens) -> ids; the prompt starts with what encode("") adds (a BOS)."""
    ids, chunks = list(encode("", True)), []
    for i, part in enumerate(parts):
        if isinstance(part, Chunk):
            toks = encode(part.text, False)
            if toks:
                chunks.append(toks)
        elif isinstance(part, str):
            toks = encode(part, False)
        elif isinstance(part, (list, tuple)) and all(_is_token(t) for t in part):
            toks = list(part)
        else:
            raise InvalidRequestError(f"prompt part {i} must be a str, a Chunk or token ids, got {type(part).__name__}")
        ids.extend(toks)
    return ids, (ChunkReuse(tuple(chunks), share) if chunks else None)
