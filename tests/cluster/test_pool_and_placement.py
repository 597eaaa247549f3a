"""KV pool and placement changes on a real cluster: a shared prompt prefix skips its prefill (counted),
a tiny pool evicts and results stay correct, a placement published mid-decode changes nothing."""

import time

import pytest
import ray

from checkpoints import engine_greedy
from raymoe.actors.cluster import MoECluster
from raymoe.cluster.cluster import ClusterConfig
from raymoe.engine.llm_engine import EngineConfig
from raymoe.engine.sampling_params import SamplingParams

from progress import generate_while

ENGINE = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=8, kv_cache_bytes=16 << 20)
PARAMS = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
PREFIX = [(3 * j * j + 1) % 250 + 3 for j in range(48)]  # 6 full blocks
PROMPTS = [PREFIX + [10 + i, 20 + i, 30 + i] for i in range(8)]


@pytest.fixture(scope="module")
def path(checkpoint_dir):
    return checkpoint_dir("qwen2_moe")


@pytest.fixture(scope="module")
def expected(path):
    return engine_greedy(path, PROMPTS, PARAMS, ENGINE)


@pytest.fixture(scope="module")
def cluster(ray_cluster, path):
    config = ClusterConfig(engine=ENGINE, namespace="pool", num_decode_workers=2,
                           prefill_resources={"node_b": 0.01}, decode_resources={"node_c": 0.01})  # fmt: skip
    c = MoECluster(path, config)
    yield c
    c.shutdown()


def test_shared_prefix_skips_prefill(cluster, expected):
    first = cluster.generate(PROMPTS[:1], PARAMS)
    hits_before = cluster.stats()["prefill"][0]["prefix_hit_tokens"]
    rest = cluster.generate(PROMPTS[1:], PARAMS)
    hits = cluster.stats()["prefill"][0]["prefix_hit_tokens"] - hits_before
    assert [o.token_ids for o in first + rest] == expected
    assert hits >= 7 * len(PREFIX)  # every later prompt found the 48-token prefix cached
    assert any(s["hits"] > 0 for s in cluster.pool_stats().values())


def test_placement_change_mid_decode(cluster, expected):
    epoch = ray.get(cluster.controller.placement.remote())[0].epoch
    got, new_epoch = generate_while(
        cluster, PROMPTS, PARAMS, lambda: ray.get(cluster.controller.rebalance.remote(2), timeout=120)
    )
    assert new_epoch > epoch
    assert got == expected
    assert all(ray.get(w.epoch.remote()) == new_epoch for w in cluster.router.decode)


def test_tiny_pool_evicts_and_stays_correct(ray_cluster, path, expected):
    block_bytes = 8 * 2 * 3 * 2 * 16 * 4  # block_size * (k + v) * layers * kv_heads * head_dim * fp32
    config = ClusterConfig(engine=ENGINE, namespace="tiny-pool", kv_pool_bytes=3 * block_bytes,
                           prefill_resources={"node_b": 0.01})  # fmt: skip
    c = MoECluster(path, config)
    try:
        assert [o.token_ids for o in c.generate(PROMPTS, PARAMS)] == expected
        assert sum(s["evictions"] for s in c.pool_stats().values()) > 0
    finally:
        c.shutdown()


def test_policy_rebalance_from_reported_load(cluster, expected):
    """The controller re-plans with a registry policy from the load the decode workers reported."""
    assert [o.token_ids for o in cluster.generate(PROMPTS, PARAMS)] == expected
    deadline = time.monotonic() + 30
    while ray.get(cluster.controller.load.remote()).__len__() and time.monotonic() < deadline:
        if sum(map(sum, ray.get(cluster.controller.load.remote()))) > 0:
            break
        time.sleep(0.2)
    epoch = ray.get(cluster.controller.rebalance.remote(2, "replication"), timeout=120)
    placement, _ = ray.get(cluster.controller.placement.remote())
    assert placement.epoch == epoch
    assert max(len(s) for s in placement.expert_to_shards.values()) >= 2  # hot experts replicated
    assert [o.token_ids for o in cluster.generate(PROMPTS, PARAMS)] == expected
