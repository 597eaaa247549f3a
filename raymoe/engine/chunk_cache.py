"""Reuse scores of cached chunks, and an in-process chunk store for the one-process engine.

Eviction follows Greedy-Dual-Size-Frequency: an entry's priority is `clock + worth`, set when it is
stored or hit; the entry of lowest priority goes first and the clock rises to its priority, so
entries not hit for a while fall behind newly touched ones (recency). A chunk's worth is its uses
times the share of its tokens a hit saved (frequency and compute saved, per byte of its KV).
A plain prefix block has worth 1 and no frequency: among plain blocks this is exactly LRU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.errors import ConfigError


def chunk_worth(hits: int, saved_tokens: int, credited_hits: int, num_tokens: int) -> float:
    """(1 + hits) uses times the mean share of the chunk's tokens a hit saved (1 before any credit)."""
    saved_share = saved_tokens / (credited_hits * num_tokens) if credited_hits and num_tokens else 1.0
    return (1 + hits) * saved_share


@dataclass(slots=True)
class ChunkEntry:
    handle: object  # the value, or what a reader gets for it
    nbytes: int
    num_tokens: int
    priority: float = 0.0
    touched: int = 0  # global access counter: ties go to the least recent
    hits: int = 0
    saved_tokens: int = 0
    credited_hits: int = 0

    def rescore(self, clock: float, tick: int) -> None:
        self.priority = clock + chunk_worth(self.hits, self.saved_tokens, self.credited_hits, self.num_tokens)
        self.touched = tick


class ChunkTable:
    """Chunk entries with their statistics; the owner holds the byte budget and the clock."""

    def __init__(self):
        self.entries: dict[str, ChunkEntry] = {}
        self.hits = self.misses = self.saved_tokens = self.evictions = 0
        self.bytes = 0

    def add(self, key: str, entry: ChunkEntry) -> None:
        self.entries[key] = entry
        self.bytes += entry.nbytes

    def remove(self, key: str) -> ChunkEntry:
        entry = self.entries.pop(key)
        self.bytes -= entry.nbytes
        return entry

    def lookup(self, key: str, clock: float, tick: int) -> ChunkEntry | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        entry.hits += 1
        entry.rescore(clock, tick)
        return entry

    def credit(self, key: str, saved: int, clock: float, tick: int) -> None:
        self.saved_tokens += saved
        entry = self.entries.get(key)
        if entry is not None:
            entry.saved_tokens += saved
            entry.credited_hits += 1
            entry.rescore(clock, tick)

    def lowest(self) -> tuple[str, ChunkEntry] | None:
        """The entry to evict first (lowest priority, then least recently touched)."""
        if not self.entries:
            return None
        return min(self.entries.items(), key=lambda kv: (kv[1].priority, kv[1].touched))

    def stats(self) -> dict[str, int]:
        return {
            "chunk_entries": len(self.entries),
            "chunk_bytes": self.bytes,
            "chunk_hits": self.hits,
            "chunk_misses": self.misses,
            "chunk_saved_tokens": self.saved_tokens,
            "chunk_evictions": self.evictions,
        }


class LocalChunkStore:
    """A `ChunkStore` in this process: packed chunk KV under a byte budget, evicted by reuse score."""

    def __init__(self, capacity_bytes: int):
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ConfigError(f"chunk cache capacity must be positive bytes, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self.table = ChunkTable()
        self.clock, self.tick = 0.0, 0

    def get_chunks(self, keys: list[str]) -> list[torch.Tensor | None]:
        out = []
        for key in keys:
            self.tick += 1
            entry = self.table.lookup(key, self.clock, self.tick)
            out.append(None if entry is None else entry.handle)
        return out

    def put_chunks(self, keys: list[str], values: list[torch.Tensor], num_tokens: list[int]) -> None:
        for key, value, n in zip(keys, values, num_tokens, strict=True):
            if key in self.table.entries:
                self.table.remove(key)
            nbytes = value.numel() * value.element_size()
            if nbytes > self.capacity_bytes:
                continue
            self.tick += 1
            entry = ChunkEntry(value, nbytes, n)
            entry.rescore(self.clock, self.tick)
            self.table.add(key, entry)
            while self.table.bytes > self.capacity_bytes:
                victim_key, victim = self.table.lowest()
                self.clock = max(self.clock, victim.priority)
                self.table.remove(victim_key)
                self.table.evictions += 1

    def credit_chunks(self, keys: list[str], saved_tokens: list[int]) -> None:
        for key, saved in zip(keys, saved_tokens, strict=True):
            self.tick += 1
            self.table.credit(key, saved, self.clock, self.tick)

    def stats(self) -> dict[str, int]:
        return {**self.table.stats(), "capacity_bytes": self.capacity_bytes}
