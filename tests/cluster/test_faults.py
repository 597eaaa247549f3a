"""Workers die mid-generation; every request still completes with the tokens of an undisturbed
run, none lost or repeated: a dead decode worker's sequences resume on another from the KV pool
and the tokens already delivered; a dead expert shard is routed around (replica) or re-created."""

import time

import pytest
import ray

from raymoe.actors.cluster import MoECluster
from raymoe.cluster.cluster import ClusterConfig
from raymoe.engine.llm_engine import EngineConfig
from raymoe.engine.sampling_params import SamplingParams

from progress import generate_while

PROMPTS = [[(5 * i + 11 * j) % 250 + 3 for j in range(n)] for i, n in enumerate([9, 40, 17, 3, 26, 64, 12, 30])]
PARAMS = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
ENGINE = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=8, kv_cache_bytes=16 << 20)


@pytest.fixture(scope="module")
def cluster(ray_cluster, checkpoint_dir):
    config = ClusterConfig(engine=ENGINE, namespace="faults", replicas=2, num_decode_workers=3,
                           prefill_resources={"node_b": 0.01})  # fmt: skip
    c = MoECluster(checkpoint_dir("mixtral"), config)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def undisturbed(cluster):
    return [o.token_ids for o in cluster.generate(PROMPTS, PARAMS)]


def test_colocated_rows_never_reach_the_transport(cluster, undisturbed):
    """Every node holds a shard, so every worker co-hosts its node's experts: those rows run in
    the worker's process, and the shards ran exactly the rows the workers counted as sent."""
    workers = cluster.prefill + cluster.router.decode
    counts = [s["dispatch"] for s in ray.get([w.stats.remote() for w in workers])]
    assert all(c["rows_local"] > 0 and c["rows_local"] + c["rows_process"] == c["pairs"] for c in counts)
    assert sum(c["rows_local"] for c in counts) > sum(c["rows_process"] for c in counts)
    _, shards = ray.get(cluster.controller.placement.remote())
    served = sum(s["rows_served"] for s in ray.get([h.stats.remote() for h in shards]))
    assert served == sum(c["rows_process"] for c in counts)
    decoders = [c for c in counts[len(cluster.prefill):] if c["pairs"]]
    deadline = time.monotonic() + 30
    while True:  # the decode workers report to the controller when they go idle
        by_node = ray.get(cluster.controller.status.remote())["dispatch"]
        if sum(n["rows_local"] for n in by_node.values()) == sum(c["rows_local"] for c in decoders):
            break
        assert time.monotonic() < deadline, (by_node, decoders)
        time.sleep(0.2)
    assert set(by_node) == {c["node_id"] for c in decoders}
    assert all(0 < n["local_activation_rate"] <= 1 and n["tokens"] > 0 for n in by_node.values())


def test_dead_decode_worker_sequences_resume(cluster, undisturbed):
    victim = cluster.router.decode[0]
    got, _ = generate_while(cluster, PROMPTS, PARAMS, lambda: ray.kill(victim, no_restart=True))
    assert got == undisturbed
    assert all(len(t) == PARAMS.max_tokens for t in got)  # none lost, none repeated
    assert cluster.router.num_resumed > 0


def test_dead_expert_shard_is_routed_around(cluster, undisturbed):
    _, shards = ray.get(cluster.controller.placement.remote())
    got, _ = generate_while(cluster, PROMPTS, PARAMS, lambda: ray.kill(shards[0], no_restart=True))
    assert got == undisturbed
