"""What every deployment of `backend: cluster` shares: the cluster settings, the controller (one
named, detached actor per namespace, started by whichever replica comes first), and the worker
actor each prefill or decode replica owns.

A replica owns its worker actor (the model, the engine, the expert dispatch) the way a Ray Serve
LLM replica owns its engine workers: the actor dies with the replica, Serve's autoscaler adds and
removes both together, and the controller pushes placement updates to the actor.
"""

from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raymoe.config import DeploymentSettings, RaymoeConfig

NAMESPACE = "raymoe-serve"
READY_TIMEOUT_S = 300


def cluster_config(config: RaymoeConfig):
    """raymoe.config settings -> raymoe.cluster.cluster.ClusterConfig."""
    from raymoe.cluster.cluster import ClusterConfig

    c = config.cluster
    return ClusterConfig(
        shards_per_node=c.shards_per_node, replicas=c.replicas, num_microbatches=c.num_microbatches,
        colocate_experts=c.colocate_experts, shard_num_gpus=c.shard_num_gpus, transport=c.transport,
        engine=config.engine.to_engine_config(), kv_pool_bytes=c.kv_pool_bytes,
        placement_policy=c.placement_policy, rebalance_interval_s=c.rebalance_interval_s, namespace=NAMESPACE,
    )  # fmt: skip


def ensure_controller(config: RaymoeConfig, model_path: str):
    """The namespace's controller (and its expert shards), started if absent; its handle."""
    from raymoe.actors.controller import get_or_create_controller

    c = cluster_config(config)
    controller = get_or_create_controller(
        model_path, namespace=NAMESPACE, dtype=c.engine.dtype, device=c.engine.device,
        shard_num_gpus=c.shard_num_gpus, shards_per_node=c.shards_per_node,
        replicas=c.replicas, policy=c.placement_policy, node_watch_s=config.cluster.node_watch_s,
    )  # fmt: skip
    if c.rebalance_interval_s:
        ray.get(controller.start_schedule.remote(c.rebalance_interval_s))
    return controller


def start_worker(cls, config: RaymoeConfig, model_path: str, settings: DeploymentSettings):
    """This replica's worker actor (PrefillWorker or DecodeWorker), ready; it reserves the
    deployment's CPUs, GPUs and custom resources and prefers the replica's node."""
    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(cls).options(
        num_cpus=settings.num_cpus, num_gpus=settings.num_gpus, resources=dict(settings.resources),
        max_concurrency=16, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
    ).remote(model_path, cluster_config(config), NAMESPACE)  # fmt: skip
    ray.get(actor.ready.remote(), timeout=READY_TIMEOUT_S)
    return actor


def shutdown_cluster() -> None:
    """Stop the controller, its shards and the per-node KV pools of the serving namespace."""
    from raymoe.actors.kv_pool import pool_name
    from raymoe.actors.controller import shutdown_controller

    shutdown_controller(NAMESPACE)
    for node in ray.nodes():
        try:
            ray.kill(ray.get_actor(pool_name(node["NodeID"]), namespace=NAMESPACE))
        except ValueError:  # no pool was started on that node
            pass
