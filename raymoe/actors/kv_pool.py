"""KV pool: KV blocks by key in Ray's object store, one pool per node, capacity in bytes, LRU.

Keys are strings (`raymoe.engine.kv_transfer.prompt_block_keys`): a full block's hash-chain hex,
`partial:...` for a prompt's partial tail, `chunk:<digest>` for a document chunk's KV
(`raymoe.engine.chunks`). Values are opaque to the pool: it counts their bytes and hands out handles.

Eviction (`raymoe.engine.chunk_cache`): every entry has a priority `clock + worth`, set when stored
or read; the lowest goes first and the clock rises to it. A block's worth is 1, so blocks leave in
LRU order; a chunk's worth grows with its hits and the share of its tokens a hit saved, so a chunk
reused often outlives blocks read as recently. Chunk statistics are in `chunk_stats()`.

`KVPoolCore` is the bookkeeping (entries in least-recently-used order, eviction, statistics) over a
`ValueStore` that decides how values are held: in memory for tests, in Ray's object store in the
`KVPool` actor. The actor calls `ray.put` itself, so the pool owns every entry's object: an entry
outlives the worker that produced it and lives until evicted (or until the pool dies). Readers get
ObjectRefs and `ray.get` them: on the pool's node a numpy array maps the shared memory without a
copy (read-only); elsewhere Ray pulls the object over once. A reader holding a ref borrows the
object, so an eviction never frees data under a read in progress; the pool's byte count covers only
the entries it still holds.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raymoe.engine.chunk_cache import ChunkEntry, ChunkTable
from raymoe.engine.chunks import CHUNK_PREFIX
from raymoe.errors import ConfigError


class ValueStore(Protocol):
    def put(self, value: Any) -> Any:
        """Hold a value; return the handle readers get."""

    def release(self, handle: Any) -> None:
        """Drop the pool's hold on a value (evicted or overwritten)."""


class InMemoryStore:
    """Handles are the values themselves (tests, single process)."""

    def put(self, value: Any) -> Any:
        return value

    def release(self, handle: Any) -> None:
        pass


class RayObjectStore:
    """Handles are ObjectRefs owned by the calling process (the pool actor)."""

    def put(self, value: Any) -> ray.ObjectRef:
        return ray.put(value)

    def release(self, handle: ray.ObjectRef) -> None:
        pass  # dropping the entry drops the owner's last reference; Ray frees it once borrowers finish


@dataclass(slots=True)
class Entry:
    handle: Any  # what readers get: the value or its ObjectRef
    nbytes: int
    priority: float = 0.0  # clock + 1 when last stored or read
    touched: int = 0


class KVPoolCore:
    """Entries by key under a byte budget, evicted by priority (blocks: LRU). Not thread-safe."""

    def __init__(self, capacity_bytes: int, store: ValueStore | None = None):
        if capacity_bytes <= 0:
            raise ConfigError(f"KV pool capacity must be positive bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.store = store if store is not None else InMemoryStore()
        self.entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self.bytes_stored = 0
        self.num_hits = self.num_misses = self.num_evictions = self.num_rejected = 0
        self.bytes_served = 0
        self.chunks = ChunkTable()  # chunk entries (keys with CHUNK_PREFIX), in the same byte budget
        self.clock, self.tick = 0.0, 0

    def put(self, key: str, value: Any, num_tokens: int = 0) -> bool:
        """Store `value` (anything with `.nbytes`: numpy array, tensor) under `key`, replacing an
        entry of that key; evict lowest-priority entries to fit. False if the value alone exceeds
        the capacity (it is not stored). num_tokens: a chunk's length (chunk keys only)."""
        nbytes = int(value.nbytes)
        if key in self.entries or key in self.chunks.entries:
            self._drop(key)
        if nbytes > self.capacity_bytes:
            self.num_rejected += 1
            return False
        self.tick += 1
        if key.startswith(CHUNK_PREFIX):
            entry = ChunkEntry(self.store.put(value), nbytes, num_tokens)
            entry.rescore(self.clock, self.tick)
            self.chunks.add(key, entry)
        else:
            self.entries[key] = Entry(self.store.put(value), nbytes, self.clock + 1.0, self.tick)
        self.bytes_stored += nbytes
        self._evict_to_fit()
        return True

    def put_chunks(self, keys: list[str], values: list[Any], num_tokens: list[int]) -> list[bool]:
        return [self.put(k, v, n) for k, v, n in zip(keys, values, num_tokens, strict=True)]

    def credit_chunks(self, keys: list[str], saved_tokens: list[int]) -> None:
        """Prefill tokens each chunk hit saved: statistics, and the chunk's worth."""
        for key, saved in zip(keys, saved_tokens, strict=True):
            self.tick += 1
            self.chunks.credit(key, int(saved), self.clock, self.tick)

    def chunk_stats(self) -> dict[str, int]:
        return self.chunks.stats()

    def put_many(self, keys: list[str], values: list[Any]) -> list[bool]:
        return [self.put(key, value) for key, value in zip(keys, values, strict=True)]

    def get_refs(self, keys: list[str]) -> list[Any | None]:
        """Handles of the entries, None for a miss; hits become most recently used."""
        entries = [self._lookup(key) for key in keys]
        self.bytes_served += sum(e.nbytes for e in entries if e is not None)
        return [None if e is None else e.handle for e in entries]

    def contains(self, keys: list[str]) -> list[bool]:
        """Which keys are held (a prefix-hit check); counted and touched like a read."""
        return [self._lookup(key) is not None for key in keys]

    def stats(self) -> dict[str, float]:
        lookups = self.num_hits + self.num_misses
        return {
            "hits": self.num_hits,
            "misses": self.num_misses,
            "hit_rate": self.num_hits / lookups if lookups else 0.0,
            "bytes_stored": self.bytes_stored,
            "bytes_served": self.bytes_served,
            "num_entries": len(self.entries) + len(self.chunks.entries),
            "evictions": self.num_evictions,
            "rejected": self.num_rejected,
            "capacity_bytes": self.capacity_bytes,
        }

    def _lookup(self, key: str) -> Entry | ChunkEntry | None:
        self.tick += 1
        if key.startswith(CHUNK_PREFIX):
            return self.chunks.lookup(key, self.clock, self.tick)
        entry = self.entries.get(key)
        if entry is None:
            self.num_misses += 1
            return None
        self.num_hits += 1
        entry.priority, entry.touched = self.clock + 1.0, self.tick
        self.entries.move_to_end(key)
        return entry

    def _evict_to_fit(self) -> None:
        """Drop the lowest-priority entries until the budget holds. Blocks' priorities grow in
        their LRU order, so the least recent block is the only block candidate."""
        while self.bytes_stored > self.capacity_bytes:
            candidates = [c for c in (next(iter(self.entries.items()), None), self.chunks.lowest()) if c]
            key, entry = min(candidates, key=lambda kv: (kv[1].priority, kv[1].touched))
            self.clock = max(self.clock, entry.priority)
            self._drop(key)
            self.num_evictions += 1
            if key.startswith(CHUNK_PREFIX):
                self.chunks.evictions += 1

    def _drop(self, key: str) -> None:
        entry = self.chunks.remove(key) if key in self.chunks.entries else self.entries.pop(key)
        self.bytes_stored -= entry.nbytes
        self.store.release(entry.handle)


@ray.remote(num_cpus=0)
class KVPool:
    """One node's pool: a thin shell over KVPoolCore whose values live in Ray's object store."""

    def __init__(self, capacity_bytes: int):
        torch.set_num_threads(1)
        self.core = KVPoolCore(capacity_bytes, RayObjectStore())

    def put_many(self, keys: list[str], values: list[Any]) -> list[bool]:
        return self.core.put_many(keys, values)

    def get_refs(self, keys: list[str]) -> list[ray.ObjectRef | None]:
        return self.core.get_refs(keys)

    def contains(self, keys: list[str]) -> list[bool]:
        return self.core.contains(keys)

    def stats(self) -> dict[str, float]:
        return self.core.stats()

    def put_chunks(self, keys: list[str], values: list[Any], num_tokens: list[int]) -> list[bool]:
        return self.core.put_chunks(keys, values, num_tokens)

    def credit_chunks(self, keys: list[str], saved_tokens: list[int]) -> None:
        self.core.credit_chunks(keys, saved_tokens)

    def chunk_stats(self) -> dict[str, int]:
        return self.core.chunk_stats()


def pool_name(node_id: str) -> str:
    return f"raymoe-kvpool-{node_id[:8]}"


def get_or_create_pool(node_id: str, capacity_bytes: int, namespace: str | None = None) -> ray.actor.ActorHandle:
    """The named pool of a node, created pinned to it if absent (an existing pool keeps its
    capacity). Detached, so it outlives whichever worker created it."""
    return KVPool.options(
        name=pool_name(node_id),
        namespace=namespace,
        get_if_exists=True,
        lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(capacity_bytes)


class KVPoolClient:
    """Blocks in and out of a pool as tensors (exported blocks: `raymoe.engine.kv_transfer`).

    Blocks travel as numpy arrays, which a reader on the pool's node gets without a copy. The
    tensors `get_blocks` returns may share the object store's memory: read them (import_blocks
    copies them into a cache), never write them. `dtype` is the blocks' torch dtype; needed only
    where numpy has none (bfloat16), whose bits travel as a same-width integer array.
    """

    def __init__(self, pool: ray.actor.ActorHandle, dtype: torch.dtype | None = None, timeout_s: float | None = None):
        self.pool, self.dtype, self.timeout_s = pool, dtype, timeout_s

    def put_blocks(self, keys: list[str], tensors: list[torch.Tensor]) -> list[bool]:
        """Store the blocks; returns once the pool holds them (False: larger than the pool)."""
        arrays = [_to_numpy(t) for t in tensors]
        return ray.get(self.pool.put_many.remote(list(keys), arrays), timeout=self.timeout_s)

    def get_blocks(self, keys: list[str]) -> list[torch.Tensor | None]:
        """The blocks under `keys`, None where the pool has none."""
        refs = ray.get(self.pool.get_refs.remote(list(keys)), timeout=self.timeout_s)
        values = iter(ray.get([r for r in refs if r is not None], timeout=self.timeout_s))
        return [None if r is None else self._to_tensor(next(values)) for r in refs]

    def contains(self, keys: list[str]) -> list[bool]:
        return ray.get(self.pool.contains.remote(list(keys)), timeout=self.timeout_s)

    def stats(self) -> dict[str, float]:
        return ray.get(self.pool.stats.remote(), timeout=self.timeout_s)

    # ----- chunk entries: this client is a `raymoe.engine.chunks.ChunkStore` -------------------
    def get_chunks(self, keys: list[str]) -> list[torch.Tensor | None]:
        return self.get_blocks(keys)

    def put_chunks(self, keys: list[str], values: list[torch.Tensor], num_tokens: list[int]) -> None:
        arrays = [_to_numpy(t) for t in values]
        ray.get(self.pool.put_chunks.remote(list(keys), arrays, list(num_tokens)), timeout=self.timeout_s)

    def credit_chunks(self, keys: list[str], saved_tokens: list[int]) -> None:
        ray.get(self.pool.credit_chunks.remote(list(keys), list(saved_tokens)), timeout=self.timeout_s)

    def chunk_stats(self) -> dict[str, int]:
        return ray.get(self.pool.chunk_stats.remote(), timeout=self.timeout_s)

    def _to_tensor(self, value: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(value, np.ndarray):
            with warnings.catch_warnings():  # read-only shared memory: by design, see the class doc
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                value = torch.from_numpy(value)
        if self.dtype is not None and value.dtype != self.dtype:
            value = value.view(self.dtype)
        return value


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    try:
        return t.numpy()
    except TypeError:  # bfloat16, float8: no numpy dtype, ship the bits
        return t.view(_SAME_WIDTH_INT[t.element_size()]).numpy()
