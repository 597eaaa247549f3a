"""The disaggregated cluster on a real 3-node local Ray cluster returns exactly the greedy tokens
of the one-process engine and of transformers: any shard count, replicas, microbatches, prefill
and decode on different nodes, two model families."""

import itertools
import time
from dataclasses import replace

import pytest
import ray

from checkpoints import assert_same_greedy, engine_greedy, load_reference, reference_greedy
from progress import generate_while
from raymoe.actors.cluster import MoECluster
from raymoe.cluster.cluster import ClusterConfig
from raymoe.engine.llm_engine import EngineConfig
from raymoe.engine.sampling_params import SamplingParams

NEW_TOKENS = 16
PROMPTS = [[(7 * i + 3 * j * j) % 250 + 3 for j in range(n)] for i, n in enumerate([5, 33, 12, 70, 1, 20])]
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
ENGINE = EngineConfig(max_num_seqs=8, max_num_batched_tokens=32, block_size=8, kv_cache_bytes=16 << 20)
_namespaces = itertools.count()


def run_cluster(path, **overrides) -> list[list[int]]:
    config = ClusterConfig(engine=ENGINE, namespace=f"lossless-{next(_namespaces)}", **overrides)
    cluster = MoECluster(path, config)
    try:
        placement, _ = ray.get(cluster.controller.placement.remote())
        assert placement.num_shards == overrides["num_shards"]
        if "decode_resources" in overrides:  # prefill and decode really run on different nodes
            assert set(cluster.prefill_nodes) == {node_with("node_b")}
            assert set(ray.get([w.node_id.remote() for w in cluster.decode])) == {node_with("node_c")}
        return [o.token_ids for o in cluster.generate(PROMPTS, GREEDY)]
    finally:
        cluster.shutdown()


def node_with(resource: str) -> str:
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"])


@pytest.fixture(scope="module")
def expected(checkpoint_dir):
    """family -> greedy tokens of the one-process engine, checked against transformers once."""
    cache = {}

    def get(family):
        if family not in cache:
            path = checkpoint_dir(family)
            tokens = engine_greedy(path, PROMPTS, GREEDY, ENGINE)
            reference = load_reference(path)
            for prompt, got in zip(PROMPTS, tokens):
                assert_same_greedy(reference, prompt, got, reference_greedy(reference, prompt, NEW_TOKENS))
            cache[family] = tokens
        return cache[family]

    return get


SPLIT = dict(prefill_resources={"node_b": 0.01}, decode_resources={"node_c": 0.01})
ARRANGEMENTS = {
    "1-shard": dict(num_shards=1, num_microbatches=1),
    "2-shards-mb2-split": dict(num_shards=2, num_microbatches=2, **SPLIT),
    "4-shards-replicas-mb4-2-decoders-split": dict(
        num_shards=4, replicas=2, num_microbatches=4, num_decode_workers=2, **SPLIT
    ),
}


# every arrangement on mixtral; qwen2_moe (shared experts) on the one that has every feature at once
CASES = [(a, "mixtral") for a in ARRANGEMENTS] + [("4-shards-replicas-mb4-2-decoders-split", "qwen2_moe")]


@pytest.mark.parametrize("arrangement,family", CASES)
def test_cluster_greedy_equals_one_process(ray_cluster, checkpoint_dir, expected, family, arrangement):
    got = run_cluster(checkpoint_dir(family), **ARRANGEMENTS[arrangement])
    assert got == expected(family)


def test_rows_through_a_collective_group_are_lossless(ray_cluster, checkpoint_dir, expected):
    """`transport: gloo` (the CPU twin of NCCL): the decode worker sends every row to the shards
    over a collective group (co-location off, so no row stays in process); same tokens."""
    path = checkpoint_dir("mixtral")
    config = ClusterConfig(engine=ENGINE, namespace=f"lossless-{next(_namespaces)}", num_shards=2,
                           colocate_experts=False, transport="gloo", **SPLIT)  # fmt: skip
    cluster = MoECluster(path, config)

    def gloo_world_size(shard) -> int:  # nested: pickled by value (the shards cannot import this module)
        import torch.distributed

        return torch.distributed.get_world_size()

    try:
        got = [o.token_ids for o in cluster.generate(PROMPTS, GREEDY)]
        _, shards = ray.get(cluster.controller.placement.remote())
        world = ray.get([s.__ray_call__.remote(gloo_world_size) for s in shards], timeout=60)
        counts = ray.get(cluster.decode[0].stats.remote(), timeout=60)["dispatch"]
    finally:
        cluster.shutdown()
    assert got == expected("mixtral") and world == [3, 3]  # worker + 2 shards
    assert counts["rows_process"] > 0


def test_prompt_kv_comes_straight_from_the_prefill_worker(ray_cluster, checkpoint_dir, expected):
    """`kv_transport: gloo` (Ray Direct Transport over a gloo group, NCCL's CPU twin): prefill on
    node B hands every prompt's blocks straight to two decode workers on node C, none through the
    pool; same tokens."""
    path = checkpoint_dir("mixtral")
    config = ClusterConfig(engine=ENGINE, namespace=f"lossless-{next(_namespaces)}", num_shards=1,
                           num_decode_workers=2, kv_transport="gloo", **SPLIT)  # fmt: skip
    cluster = MoECluster(path, config)

    def gloo_world_size(worker) -> int:  # nested: pickled by value
        import torch.distributed

        worker.core.publisher.drain()  # the pool publishes run in the background: wait for them
        return torch.distributed.get_world_size()

    try:
        got = [o.token_ids for o in cluster.generate(PROMPTS, GREEDY)]
        decode = cluster.stats()["decode"]
        world = ray.get(cluster.prefill[0].__ray_call__.remote(gloo_world_size), timeout=60)
        pooled = cluster.pool_stats()[cluster.prefill_nodes[0]]["num_entries"]  # the fallback has them too
        victim = cluster.router.decode[0]  # a decode worker of the group dies: its sequences resume from the pool
        resumed, _ = generate_while(cluster, PROMPTS, GREEDY, lambda: ray.kill(victim, no_restart=True), 20)
        cluster.router._send = kill_sender_first(cluster.router._send)  # the prefill worker dies before sending
        refetched = [o.token_ids for o in cluster.generate(PROMPTS, GREEDY)]
    finally:
        cluster.shutdown()
    assert got == expected("mixtral") and world == 3  # 1 prefill + 2 decode workers
    full_blocks = sum(len(p) // ENGINE.block_size for p in PROMPTS)
    assert sum(s["kv_direct_blocks"] for s in decode) == full_blocks > 0
    assert sum(s["kv_pool_blocks"] for s in decode) == 0 and pooled == full_blocks
    assert all(s["sequences"] > 0 for s in decode)  # both decode workers took blocks over the group
    assert resumed == expected("mixtral") and cluster.router.num_resumed > 0
    # its blocks never come: the decode worker is kept and gets them from the pool (or recomputes)
    assert refetched == expected("mixtral") and cluster.router.num_kv_fallbacks == 1
    assert len(cluster.router.decode) == 1


def kill_sender_first(send):
    """Wrap RequestRouter._send: kill the prefill worker holding the blocks, and wait for its death."""

    def send_after_kill(worker, source, items):
        if source is not None:
            ray.kill(source, no_restart=True)
            with pytest.raises(ray.exceptions.RayActorError):
                for _ in range(200):
                    ray.get(source.ready.remote(), timeout=30)
                    time.sleep(0.05)
        return send(worker, source, items)

    return send_after_kill


def test_drafts_ride_the_same_expert_round_trips(ray_cluster, checkpoint_dir, expected):
    """Speculative decoding in the decode worker (Token Recycling; 2 shards, 2 microbatches,
    prefill and decode on different nodes): the same tokens, and each step, however many drafts it
    verifies, is one expert round trip per MoE layer and microbatch."""
    path = checkpoint_dir("mixtral")
    config = ClusterConfig(engine=replace(ENGINE, speculative="token_recycling"), namespace=f"lossless-{next(_namespaces)}",
                           num_shards=2, num_microbatches=2, **SPLIT)  # fmt: skip
    cluster = MoECluster(path, config)
    try:
        got = [o.token_ids for o in cluster.generate(PROMPTS, GREEDY)]
        stats, timings = ray.get([cluster.decode[0].stats.remote(), cluster.decode[0].take_timings.remote()], timeout=60)
    finally:
        cluster.shutdown()
    assert got == expected("mixtral")
    spec = stats["speculative"]
    assert spec["method"] == "token_recycling" and spec["num_accepted_tokens"] > 0 and spec["mean_accepted_tokens"] > 1
    assert timings["calls"] <= stats["steps"] * 2 * 3  # microbatches x MoE layers (mixtral: all 3)
