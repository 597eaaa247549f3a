"""What a worker actor connects to: the controller's expert placement, and the per-node KV pools."""

from __future__ import annotations

import ray

from raymoe.actors.kv_pool import KVPoolClient, get_or_create_pool
from raymoe.model.spec import load_spec


def connect_experts(namespace: str, model_path: str, config, transport: str = "actor_call"):
    """A RemoteExperts backend on the controller's current placement; the worker registers for
    placement updates (applied at its next step boundary). `config.colocate_experts`: the worker
    runs the experts placed on its own node in its own process (an `ExpertShardCore`, weights
    shared with the node's shards through one mapping, see `raymoe.model.expert_file`).
    `transport`: how the other rows reach shards (`ClusterConfig.transport`)."""
    from raymoe.actors.expert_shard import ExpertShardCore
    from raymoe.cluster.controller import CONTROLLER_NAME
    from raymoe.cluster.dispatch import RemoteExperts

    controller = ray.get_actor(CONTROLLER_NAME, namespace=namespace)
    placement, handles = ray.get(controller.placement.remote())
    spec = load_spec(model_path)

    def on_shard_failure(shard_index: int):
        return ray.get(controller.shard_failed.remote(shard_index))

    engine = config.engine
    local = ExpertShardCore(model_path, [], engine.dtype, engine.device) if config.colocate_experts else None
    experts = RemoteExperts(placement, handles, spec.num_layers, spec.num_experts, on_shard_failure=on_shard_failure,
                            local=local, num_moe_layers=len(spec.moe_layer_ids),
                            transport=make_transport(transport, handles))  # fmt: skip
    context = ray.get_runtime_context()
    ray.get(controller.register_worker.remote(context.get_actor_id(), context.current_actor))
    return experts


def make_transport(name: str, handles: list):
    """The `Transport` named by `ClusterConfig.transport` over these shard handles."""
    if name == "actor_call":
        from raymoe.cluster.transport import ActorCallTransport

        return ActorCallTransport(handles)
    from raymoe.cluster.transport_nccl import CollectiveTransport

    return CollectiveTransport(handles, backend=name)


class PoolSet:
    """This node's KV pool (writes) and any node's pool (reads: a handed-over prompt's KV sits in
    the pool of the node that prefilled it)."""

    def __init__(self, namespace: str, capacity_bytes: int, dtype):
        self.namespace, self.capacity_bytes, self.dtype = namespace, capacity_bytes, dtype
        self.node_id = ray.get_runtime_context().get_node_id()
        self.clients: dict[str, KVPoolClient] = {}

    def client(self, node_id: str) -> KVPoolClient:
        if node_id not in self.clients:
            pool = get_or_create_pool(node_id, self.capacity_bytes, self.namespace)
            self.clients[node_id] = KVPoolClient(pool, self.dtype, timeout_s=60)
        return self.clients[node_id]

    def get_blocks(self, keys: list[str], source_node_id: str | None = None) -> list:
        """Blocks by key: this node's pool first, then the source node's for what it lacks."""
        blocks = self.client(self.node_id).get_blocks(keys)
        missing = [i for i, b in enumerate(blocks) if b is None]
        if missing and source_node_id and source_node_id != self.node_id:
            try:
                found = self.client(source_node_id).get_blocks([keys[i] for i in missing])
            except ray.exceptions.RayError:  # that node (or its pool) is gone: recompute instead
                found = [None] * len(missing)
            for i, b in zip(missing, found):
                blocks[i] = b
        return blocks

    def put_blocks(self, keys: list[str], tensors: list) -> None:
        self.client(self.node_id).put_blocks(keys, tensors)

    def contains(self, keys: list[str]) -> list[bool]:
        return self.client(self.node_id).contains(keys)

    def stats(self) -> dict:
        return self.client(self.node_id).stats()


def pool_set(namespace: str, config) -> PoolSet:
    return PoolSet(namespace, config.kv_pool_bytes, config.engine.torch_dtype)
