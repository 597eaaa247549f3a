"""The direct KV path's pieces without Ray: its config checks, the prefill side's kept blocks and
the decode side's fetch (direct first, the pool for the rest). The path on a real cluster is in
test_cluster_lossless.py (`test_prompt_kv_comes_straight_from_the_prefill_worker`)."""

import pytest
import torch

from raymoe.cluster.cluster import ClusterConfig
from raymoe.cluster.kv_direct import DirectBlocks, KeptKV, Publisher, blocks_by_key, kv_group_name
from raymoe.errors import ConfigError


def test_kv_transport_config_is_checked():
    assert ClusterConfig().kv_transport == "pool"
    assert ClusterConfig(kv_transport="gloo").kv_transport == "gloo"
    assert ClusterConfig(kv_transport="nccl", worker_num_gpus=0.25).kv_transport == "nccl"
    with pytest.raises(ConfigError, match="kv_transport must be one of"):
        ClusterConfig(kv_transport="rdma")
    with pytest.raises(ConfigError, match="worker_num_gpus > 0"):
        ClusterConfig(kv_transport="nccl")
    with pytest.raises(ConfigError, match="one gloo group"):  # torch.distributed: one world per process
        ClusterConfig(kv_transport="gloo", transport="gloo")
    assert kv_group_name("ns-a") != kv_group_name("ns-b")


def blocks(*values: float, numel: int = 4) -> list[torch.Tensor]:
    return [torch.full((numel,), v) for v in values]


def test_kept_blocks_are_taken_once_as_one_tensor():
    kept = KeptKV(max_requests=2)
    kept.keep("a", ["k1", "k2"], blocks(1, 2))
    kept.keep("b", ["k1", "k3"], blocks(1, 3))  # a shared prefix block goes once
    taken = kept.take(["a", "b", "unknown"], 4, torch.float32, "cpu")
    assert taken["keys"] == ["k1", "k2", "k3"]
    assert taken["blocks"].shape == (3, 4) and taken["blocks"][:, 0].tolist() == [1, 2, 3]
    assert kept.take(["a"], 4, torch.float32, "cpu")["blocks"].shape == (0, 4)  # taken already
    for rid in "xyz":  # past max_requests the oldest go (their decode worker reads the pool)
        kept.keep(rid, [rid], blocks(0))
    assert list(kept.kept) == ["y", "z"]


def test_direct_blocks_first_then_the_pool():
    stats = {"kv_direct_blocks": 0, "kv_pool_blocks": 0}
    asked = []

    def pool(keys):
        asked.append(list(keys))
        return [torch.full((4,), 9.0) if k == "k4" else None for k in keys]

    taken = {"keys": ["k1", "k2"], "blocks": torch.stack(blocks(1, 2))}
    fetch = DirectBlocks(blocks_by_key(taken), pool, stats)
    got = fetch(["k1", "k2"])
    assert [b[0].item() for b in got] == [1, 2] and asked == []  # all direct: the pool is not asked
    got = fetch(["k2", "k4", "k5"])
    assert got[0][0].item() == 2 and got[1][0].item() == 9 and got[2] is None and asked == [["k4", "k5"]]
    assert stats == {"kv_direct_blocks": 3, "kv_pool_blocks": 1}
    assert blocks_by_key(None) == {}


def test_publishes_run_in_order_in_the_background_and_survive_a_failure():
    done = []

    def publish(keys, blocks):
        if keys == ["bad"]:
            raise ConnectionError("pool gone")  # a lost publish: readers recompute those blocks
        done.append(keys)

    publisher = Publisher(publish)
    for keys in (["a"], ["bad"], ["b"], ["c"]):
        publisher.submit(keys, blocks(1))
    publisher.drain()
    assert done == [["a"], ["b"], ["c"]]
