"""Chunk selection and storage: the recompute choice, reuse-score eviction in the local store and in
the KV pool's core (same byte budget as prefix blocks, blocks still LRU among themselves), and a
prefill worker assembling a prompt from pool chunks for a decode worker that imports it as usual."""

import numpy as np
import pytest
import torch
from test_chunks import BLOCK, CONFIG, IN_ORDER, PROMPT, greedy, run

from raymoe.actors.decode import DecodeCore
from raymoe.cluster.handoff import WorkRequest
from raymoe.actors.kv_pool import InMemoryStore, KVPoolCore
from raymoe.actors.prefill import PrefillCore
from raymoe.engine.chunk_cache import LocalChunkStore
from raymoe.engine.chunks import ChunkReuse, chunk_key, select_recompute
from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.engine.sampling_params import SamplingParams
from raymoe.model.model import load_model


def test_select_recompute_takes_the_most_deviating_tokens():
    dev = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.0, 0.3, 9.0, 0.1, 0.2, 0.1])
    assert select_recompute(dev, 0.3).tolist() == [1, 3, 6]
    assert select_recompute(dev, 0.25).tolist() == [1, 3, 6]  # ceil: a share never rounds to none
    assert select_recompute(dev, 0.0).tolist() == []
    assert select_recompute(dev, 1.0).tolist() == list(range(10))
    assert select_recompute(dev, None).tolist() == [1, 6]  # adaptive: above mean + std (4.8)
    flat = torch.ones(10)
    assert select_recompute(flat, None).tolist() == []  # nothing stands out: nothing to repair


def chunk_value(n_floats: int) -> torch.Tensor:
    return torch.zeros(n_floats, dtype=torch.float32)


def test_local_store_evicts_by_reuse_score_and_counts_savings():
    store = LocalChunkStore(3 * 400)
    store.put_chunks(["chunk:a", "chunk:b", "chunk:c"], [chunk_value(100)] * 3, [10, 10, 10])
    for _ in range(3):  # a is reused often and saves most of its tokens
        assert store.get_chunks(["chunk:a"])[0] is not None
        store.credit_chunks(["chunk:a"], [9])
    store.get_chunks(["chunk:c"])
    store.credit_chunks(["chunk:c"], [6])  # c was read after a, once, and saved less
    store.put_chunks(["chunk:d"], [chunk_value(100)], [10])
    assert set(store.table.entries) == {"chunk:a", "chunk:c", "chunk:d"}  # b: never reused
    store.put_chunks(["chunk:e"], [chunk_value(100)], [10])
    assert set(store.table.entries) == {"chunk:a", "chunk:c", "chunk:e"}  # d: stored, never read
    assert store.get_chunks(["chunk:zz"]) == [None]
    stats = store.stats()
    assert stats["chunk_bytes"] <= stats["capacity_bytes"] == 1200
    assert (stats["chunk_hits"], stats["chunk_misses"], stats["chunk_saved_tokens"]) == (4, 1, 33)
    assert stats["chunk_evictions"] == 2


def value(fill: float, n: int = 10) -> np.ndarray:
    return np.full(n, fill, dtype=np.float32)  # 40 bytes


def test_pool_core_keeps_chunks_in_its_byte_budget_and_blocks_in_lru_order():
    core = KVPoolCore(5 * 40, InMemoryStore())
    core.put_chunks(["chunk:doc"], [value(9)], [64])
    for i, key in enumerate("abcd"):
        core.put(key, value(i))
    for _ in range(2):  # the chunk is hit: worth more than a block read as recently
        assert core.get_refs(["chunk:doc"])[0] is not None
        core.credit_chunks(["chunk:doc"], [56])
    core.get_refs(["a"])
    core.put("e", value(4))  # over budget: the least recent block goes, not the chunk
    core.put("f", value(5))
    assert list(core.entries) == ["d", "a", "e", "f"] and "chunk:doc" in core.chunks.entries
    assert core.bytes_stored == 200 <= core.capacity_bytes
    stats, chunk = core.stats(), core.chunk_stats()
    assert (stats["hits"], stats["misses"], stats["num_entries"], stats["evictions"]) == (1, 0, 5, 2)
    assert chunk == {"chunk_entries": 1, "chunk_bytes": 40, "chunk_hits": 2, "chunk_misses": 0,
                     "chunk_saved_tokens": 112, "chunk_evictions": 0}  # fmt: skip
    for i in range(8):  # blocks come and go: their priorities climb past the idle chunk's
        core.put(f"x{i}", value(10 + i))
    assert "chunk:doc" in core.chunks.entries
    for i in range(8, 16):
        core.put(f"x{i}", value(10 + i))
    assert "chunk:doc" not in core.chunks.entries and core.chunk_stats()["chunk_evictions"] == 1


class DictPool:
    """A KV pool for one process: blocks by key (what PrefillCore and DecodeCore talk to)."""

    def __init__(self):
        self.blocks: dict[str, torch.Tensor] = {}

    def get_blocks(self, keys, source_node_id=None):
        return [self.blocks.get(k) for k in keys]

    def put_blocks(self, keys, tensors):
        self.blocks.update({k: t.clone() for k, t in zip(keys, tensors)})

    def contains(self, keys):
        return [k in self.blocks for k in keys]


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_prefill_assembles_from_pool_chunks_and_decode_imports_it(family, checkpoint_dir):
    model = load_model(checkpoint_dir(family))
    reuse = ChunkReuse(IN_ORDER, 0.15)
    single = LLMEngine(model, None, CONFIG, LocalChunkStore(16 << 20))
    run(single, PROMPT, greedy(1, ChunkReuse(IN_ORDER, 1.0)), "warm")
    expected = run(single, PROMPT, greedy(12, reuse))

    pool, chunks = DictPool(), LocalChunkStore(16 << 20)
    prefill = PrefillCore(LLMEngine(model, None, CONFIG), pool, chunks)
    prefill.prefill([WorkRequest("warm", PROMPT, greedy(1, ChunkReuse(IN_ORDER, 1.0)))])
    assert chunks.stats()["chunk_entries"] == 3
    request = WorkRequest("r", PROMPT, greedy(12, reuse))
    [handoff] = prefill.prefill([request])
    assert chunks.stats()["chunk_hits"] == 3 and prefill.chunk_stats()["blended_requests"] == 2

    decode = DecodeCore(LLMEngine(model, None, EngineConfig(block_size=BLOCK, kv_cache_bytes=8 << 20)), pool)
    decode.submit(WorkRequest("r", PROMPT, greedy(12, reuse), [handoff.first_token]))
    out = [handoff.first_token]
    while decode.has_work():
        out += [t for d in decode.step().values() for t in d.token_ids]
    assert out == expected
    # Every blended block came from the pool: the decode worker computed only the prompt's tail.
    computed = decode.engine.model_runner.num_computed_tokens
    assert computed <= (len(PROMPT) % BLOCK + 1) + 11
    assert decode.engine.chunk_stats()["blended_requests"] == 0
    assert chunk_key(IN_ORDER[0]) in chunks.table.entries
    assert SamplingParams().chunk_reuse is None  # off by default
