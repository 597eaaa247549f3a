"""Nodes joining and leaving a real local Ray cluster while MoECluster serves: the controller's node
watch gives a new node shards and experts, a drained node's experts move off it, a killed node's
experts are re-placed; greedy tokens always equal the one-process engine's.

This module runs its own small cluster (nodes come and go here), with a fast node health check
so a killed node is declared dead within about a second; the session's cluster, if one was
connected, is reconnected afterwards.
"""

import os
import time

import pytest
from checkpoints import engine_greedy

from raymoe.actors.cluster import MoECluster
from raymoe.cluster.cluster import ClusterConfig
from raymoe.engine.llm_engine import EngineConfig
from raymoe.engine.sampling_params import SamplingParams

PROMPTS = [[(7 * i + 5 * j) % 250 + 3 for j in range(n)] for i, n in enumerate([6, 19, 11, 30])]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ENGINE = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=8, kv_cache_bytes=16 << 20)
FAST_HEALTH_CHECK = {"health_check_period_ms": 200, "health_check_failure_threshold": 5}
ON_HEAD = {"m_head": 0.01}  # workers stay on the head: only expert shards move


@pytest.fixture(scope="module")
def ray_nodes():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray starts: loopback only
    import ray
    from ray.cluster_utils import Cluster

    previous = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    ray.shutdown()
    head = {"num_cpus": 4, "resources": {"raymoe_speed": 1, "m_head": 1}, "_system_config": FAST_HEALTH_CHECK}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    cluster.add_node(num_cpus=2, resources={"raymoe_speed": 1, "m_b": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if previous:  # the session's cluster (tests/cluster/conftest.py) goes on serving other modules
            ray.init(address=previous, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})


@pytest.fixture(scope="module")
def path(checkpoint_dir):
    return str(checkpoint_dir("mixtral"))


@pytest.fixture(scope="module")
def expected(path):
    return engine_greedy(path, PROMPTS, GREEDY, ENGINE)


@pytest.fixture(scope="module")
def moe(ray_nodes, path):
    config = ClusterConfig(engine=ENGINE, namespace="membership", prefill_resources=ON_HEAD, decode_resources=ON_HEAD)
    cluster = MoECluster(path, config)
    yield cluster
    cluster.shutdown()


def tokens(moe) -> list[list[int]]:
    return [o.token_ids for o in moe.generate(PROMPTS, GREEDY)]


def node_id_with(resource: str) -> str:
    import ray

    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"])


def wait_event(moe, kind: str, node_id: str, timeout_s: float = 60.0) -> dict:
    """The controller's event of `kind` for `node_id` (its node watch records it)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in ray.get(moe.controller.status.remote(), timeout=30)["events"]:
            if event["kind"] == kind and event["node_id"] == node_id:
                return event
        time.sleep(0.2)
    raise AssertionError(f"no {kind} event for node {node_id} within {timeout_s} s")


def shards_on(moe, node_id: str) -> list[int]:
    import ray

    placement, _ = ray.get(moe.controller.placement.remote(), timeout=30)
    return [s for s, n in enumerate(placement.shard_nodes) if n == node_id]


def test_nodes_bind_to_loopback(ray_nodes):
    import ray

    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}


def test_joined_node_gets_experts_before_its_epoch(ray_nodes, moe, expected):
    import ray

    assert tokens(moe) == expected
    before, _ = ray.get(moe.controller.placement.remote(), timeout=30)
    ray_nodes.add_node(num_cpus=2, resources={"raymoe_speed": 2, "m_c": 1})
    fast = node_id_with("m_c")
    event = wait_event(moe, "node_joined", fast)
    placement, handles = ray.get(moe.controller.placement.remote(), timeout=30)
    assert event["epoch"] == placement.epoch > before.epoch and event["experts"] > 0
    assert event["time"] >= event["detected_at"] and event["reason"] == "joined (speed 2)"
    (shard,) = shards_on(moe, fast)
    counts = [placement.num_physical(s) for s in range(placement.num_shards)]
    assert counts[shard] == max(counts)  # twice the speed: the most experts
    held = sorted(map(tuple, ray.get(handles[shard].held.remote(), timeout=30)))
    assert set(placement.experts_on(shard)) <= set(held)  # loaded before the epoch was published
    assert any(placement.shards_for(*key) == (shard,) for key in placement.expert_to_shards)  # only there
    assert tokens(moe) == expected
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}


def test_drained_node_hands_its_experts_over(moe, expected):
    import ray

    fast = node_id_with("m_c")
    (shard,) = shards_on(moe, fast)
    _, handles = ray.get(moe.controller.placement.remote(), timeout=30)
    events = ray.get(moe.controller.drain_node.remote(fast), timeout=120)
    assert [(e["kind"], e["node_id"], e["reason"]) for e in events] == [("node_left", fast, "drained")]
    assert shards_on(moe, fast) == []
    assert tokens(moe) == expected
    with pytest.raises(ray.exceptions.RayActorError):  # stopped after the workers moved on
        for _ in range(100):
            ray.get(handles[shard].ping.remote(), timeout=30)
            time.sleep(0.2)
    status = ray.get(moe.controller.status.remote(), timeout=30)
    assert status["drained"] == [fast] and fast not in {n["node_id"] for n in status["nodes"]}


def test_killed_node_experts_are_replaced(ray_nodes, moe, expected):
    import ray

    ray_nodes.add_node(num_cpus=2, resources={"raymoe_speed": 1, "m_d": 1})
    doomed = node_id_with("m_d")
    joined = wait_event(moe, "node_joined", doomed)
    node = next(n for n in ray_nodes.worker_nodes if n.node_id == doomed)
    ray_nodes.remove_node(node, allow_graceful=False)
    left = wait_event(moe, "node_left", doomed)
    assert left["reason"] == "dead" and left["epoch"] > joined["epoch"] and left["shards_removed"] == 1
    assert shards_on(moe, doomed) == []
    placement, _ = ray.get(moe.controller.placement.remote(), timeout=30)
    assert placement.epoch == left["epoch"]
    assert tokens(moe) == expected


def test_node_drained_by_ray_is_followed(ray_nodes, moe, expected):
    """Ray's own drain (what the autoscaler and KubeRay's scale-down call) moves the experts too."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    ray_nodes.add_node(num_cpus=2, resources={"raymoe_speed": 1, "m_e": 1})
    leaving = node_id_with("m_e")
    joined = wait_event(moe, "node_joined", leaving)
    preemption = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    accepted, why = GcsClient(address=ray_nodes.address).drain_node(
        leaving, preemption, "test: scale-down", int(1000 * time.time()) + 60_000
    )
    assert accepted, why
    left = wait_event(moe, "node_left", leaving)
    assert left["reason"] == "drained" and left["epoch"] > joined["epoch"] and shards_on(moe, leaving) == []
    assert tokens(moe) == expected
