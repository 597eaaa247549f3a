"""Workers die mid-generation; every request still completes with the tokens of an undisturbed
run (the one-process engine's), none lost or repeated: a dead decode worker's sequences resume on
another from the KV pool and the tokens already delivered; a dead prefill worker's batch is
prefilled again on another; a dead expert shard is routed around (replica) or re-created. Every
worker co-hosts its node's experts (each node has a shard)."""

import threading
import time

import pytest
import ray

from raymoe.actors.cluster import MoECluster
from raymoe.cluster.cluster import ClusterConfig
from raymoe.engine.llm_engine import EngineConfig
from raymoe.engine.sampling_params import SamplingParams

from checkpoints import engine_greedy
from progress import generate_while

PROMPTS = [[(5 * i + 11 * j) % 250 + 3 for j in range(n)] for i, n in enumerate([9, 40, 17, 3, 26, 64, 12, 30])]
PARAMS = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
ENGINE = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=8, kv_cache_bytes=16 << 20)


@pytest.fixture(scope="module")
def cluster(ray_cluster, checkpoint_dir):
    config = ClusterConfig(engine=ENGINE, namespace="faults", replicas=2, num_decode_workers=3, num_prefill_workers=2,
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
    ran = [c for c in counts if c["pairs"]]  # the second prefill worker may have had no batch yet
    assert len(ran) > len(cluster.router.decode) and all(c["rows_local"] > 0 for c in ran)
    assert all(c["rows_local"] + c["rows_process"] == c["pairs"] for c in counts)
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


def test_colocated_outputs_equal_one_process(checkpoint_dir, undisturbed):
    assert undisturbed == engine_greedy(checkpoint_dir("mixtral"), PROMPTS, PARAMS, ENGINE)


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


LONG_PROMPTS = [[(7 * i + 13 * j) % 250 + 3 for j in range(150)] for i in range(4)]  # a prefill of several steps


def test_dead_prefill_worker_batch_is_prefilled_again(cluster):
    """The prefill worker dies while it runs the batch: another prefills it; every request gets the
    undisturbed tokens, each once."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    undisturbed = [o.token_ids for o in cluster.generate(LONG_PROMPTS, params)]
    workers = [w for w, _ in cluster.router.prefill]
    before = ray.get([w.stats.remote() for w in workers])
    retries, result = cluster.router.num_prefill_retries, {}
    thread = threading.Thread(target=lambda: result.update(out=cluster.generate(LONG_PROMPTS, params)))
    thread.start()
    busy, deadline = None, time.monotonic() + 60
    while busy is None and time.monotonic() < deadline:  # the worker that took the batch (admitted, computing)
        now = ray.get([w.stats.remote() for w in workers])
        busy = next((w for w, a, b in zip(workers, before, now) if b["prompts"] > a["prompts"]), None)
    ray.kill(busy, no_restart=True)
    thread.join(timeout=300)
    assert [o.token_ids for o in result["out"]] == undisturbed
    assert cluster.router.num_prefill_retries == retries + 1 and len(cluster.router.prefill) == len(workers) - 1
