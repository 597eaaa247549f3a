"""KV pool: the plain core (LRU order, capacity, statistics) without Ray, then the per-node actor on
the real 3-node cluster: entries outlive their producer, same-node reads are zero-copy, eviction
under a small capacity keeps what is read back correct."""

import sys
import time
import uuid

import numpy as np
import pytest
import ray
import torch
from ray import cloudpickle
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raymoe.actors.kv_pool import KVPoolClient, KVPoolCore, get_or_create_pool, pool_name
from raymoe.errors import ConfigError

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

VALUE_BYTES = 40  # np.float32 x 10


def value(fill: float) -> np.ndarray:
    return np.full(10, fill, dtype=np.float32)


class RecordingStore:
    """In-memory store that remembers what the pool released."""

    def __init__(self):
        self.released = []

    def put(self, v):
        return v

    def release(self, handle):
        self.released.append(float(handle[0]))


def filled_core(keys, capacity_values=3):
    store = RecordingStore()
    core = KVPoolCore(capacity_values * VALUE_BYTES, store)
    for i, key in enumerate(keys):
        assert core.put(key, value(i))
    return core, store


# ----- core, no Ray --------------------------------------------------------------------------------
def test_least_recently_used_is_evicted_first():
    core, store = filled_core("abc")
    assert core.contains(["a"]) == [True]  # a read makes `a` most recent: b is now the oldest
    core.put("d", value(3))  # evicts b; order c, a, d
    core.get_refs(["c"])  # order a, d, c
    core.put("e", value(4))  # evicts a
    assert list(core.entries) == ["d", "c", "e"]  # oldest first
    assert store.released == [1.0, 0.0]  # b, then a
    assert core.stats()["evictions"] == 2


def test_capacity_is_never_exceeded_and_oversized_values_are_refused():
    core, store = filled_core("abc")
    assert core.put("big", np.zeros(20, np.float32))  # 80 bytes: evicts the two oldest
    assert list(core.entries) == ["c", "big"] and core.bytes_stored == 120
    assert not core.put("huge", np.zeros(31, np.float32))  # 124 bytes > capacity 120
    stats = core.stats()
    assert (stats["rejected"], stats["evictions"], stats["num_entries"]) == (1, 2, 2)
    assert stats["bytes_stored"] == 120 <= stats["capacity_bytes"]
    assert core.get_refs(["huge"]) == [None]


def test_hit_miss_and_byte_statistics():
    core, _ = filled_core("ab")
    refs = core.get_refs(["a", "x", "b", "a"])
    assert refs[1] is None and float(refs[0][0]) == 0.0 and float(refs[2][0]) == 1.0
    assert core.contains(["b", "y"]) == [True, False]
    assert core.stats() == {
        "hits": 4,
        "misses": 2,
        "hit_rate": 4 / 6,
        "bytes_stored": 80,
        "bytes_served": 3 * VALUE_BYTES,  # contains() serves no bytes
        "num_entries": 2,
        "evictions": 0,
        "rejected": 0,
        "capacity_bytes": 120,
    }
    assert KVPoolCore(1).stats()["hit_rate"] == 0.0


def test_overwrite_replaces_value_and_bytes_without_eviction():
    core, store = filled_core("abc")
    core.put("a", np.full(5, 9, np.float32))  # 20 bytes instead of 40; `a` becomes most recent
    assert list(core.entries) == ["b", "c", "a"]
    assert float(core.get_refs(["a"])[0][0]) == 9.0
    assert store.released == [0.0]
    assert core.bytes_stored == 100 and core.stats()["evictions"] == 0


def test_capacity_must_be_positive():
    with pytest.raises(ConfigError, match="positive"):
        KVPoolCore(0)


# ----- the actor on a real cluster -----------------------------------------------------------------
BLOCK_NUMEL = 256


def make_blocks(seed: int, n: int) -> list[torch.Tensor]:
    flat = torch.randn(n, BLOCK_NUMEL, generator=torch.Generator().manual_seed(seed))
    return [row.clone() for row in flat]


@ray.remote(num_cpus=0)
class Peer:
    """A worker that writes or reads pool blocks."""

    def __init__(self):
        torch.set_num_threads(1)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def put(self, pool, keys, seed):
        return KVPoolClient(pool).put_blocks(keys, make_blocks(seed, len(keys)))

    def read(self, pool, keys):
        """Blocks as read here, and whether the read mapped the object store's memory."""
        blocks = KVPoolClient(pool).get_blocks(keys)
        ref = ray.get(pool.get_refs.remote(keys[:1]))[0]
        first, again = ray.get(ref), ray.get(ref)
        is_zero_copy = (
            not first.flags.writeable
            and not first.flags.owndata
            and first.ctypes.data == again.ctypes.data == blocks[0].data_ptr()
        )
        return [None if b is None else b.clone() for b in blocks], is_zero_copy


def node_id_with(resource: str) -> str:
    # not imported from tests/cluster/conftest.py: under a whole-suite run `conftest` names another folder's
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"])


def on_node(actor_class, node_id):
    return actor_class.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()


def wait_until_dead(peer, timeout_s: float = 30) -> None:
    """ray.kill is asynchronous: calls may still run for a moment after it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(peer.node_id.remote(), timeout=timeout_s)
        except RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError(f"{peer} still alive {timeout_s} s after ray.kill")


def fresh_namespace() -> str:
    return f"kvpool-test-{uuid.uuid4().hex[:8]}"


def test_blocks_outlive_their_producer_and_same_node_reads_are_zero_copy(ray_cluster):
    node_b, node_c = node_id_with("node_b"), node_id_with("node_c")
    namespace = fresh_namespace()
    pool = get_or_create_pool(node_b, 1 << 20, namespace)
    assert get_or_create_pool(node_b, 1 << 20, namespace)._actor_id == pool._actor_id  # one per node
    assert ray.get(pool.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=60) == node_b
    assert ray.get_actor(pool_name(node_b), namespace=namespace)._actor_id == pool._actor_id

    keys = [f"block-{i}" for i in range(4)]
    producer = on_node(Peer, node_c)
    assert ray.get(producer.put.remote(pool, keys, seed=7), timeout=60) == [True] * 4
    ray.kill(producer)
    wait_until_dead(producer)

    reader = on_node(Peer, node_b)
    blocks, is_zero_copy = ray.get(reader.read.remote(pool, keys + ["missing"]), timeout=60)
    expected = make_blocks(7, 4)
    assert all(torch.equal(got, want) for got, want in zip(blocks[:4], expected)) and blocks[4] is None
    assert is_zero_copy
    from_head = KVPoolClient(pool, timeout_s=60).get_blocks(keys)  # another node: pulled over
    assert all(torch.equal(got, want) for got, want in zip(from_head, expected))
    stats = KVPoolClient(pool, timeout_s=60).stats()
    assert (stats["hits"], stats["misses"], stats["bytes_stored"]) == (9, 1, 4 * BLOCK_NUMEL * 4)
    ray.kill(reader)
    ray.kill(pool)


def test_eviction_under_a_small_capacity_keeps_reads_correct(ray_cluster):
    block_bytes = BLOCK_NUMEL * 2  # bfloat16
    pool = get_or_create_pool(node_id_with("node_c"), 3 * block_bytes, fresh_namespace())
    client = KVPoolClient(pool, dtype=torch.bfloat16, timeout_s=60)
    blocks = [b.to(torch.bfloat16) for b in make_blocks(3, 5)]
    keys = [f"k{i}" for i in range(5)]
    client.put_blocks(keys, blocks)
    assert client.contains(keys) == [False, False, True, True, True]
    got = client.get_blocks(keys)
    assert got[:2] == [None, None]
    assert all(g.dtype == torch.bfloat16 and torch.equal(g, b) for g, b in zip(got[2:], blocks[2:]))
    stats = client.stats()
    assert (stats["evictions"], stats["num_entries"], stats["bytes_stored"]) == (2, 3, 3 * block_bytes)
    assert stats["bytes_served"] == 3 * block_bytes
    ray.kill(pool)
