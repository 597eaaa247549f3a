"""Workers die mid-generation; every request still completes with the tokens of an undisturbed
run, none lost or repeated: a dead decode worker's sequences resume on another from the KV pool
and the tokens already delivered; a dead expert shard is routed around (replica) or re-created."""

import pytest
import ray

from raymoe.cluster.cluster import ClusterConfig, MoECluster
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
