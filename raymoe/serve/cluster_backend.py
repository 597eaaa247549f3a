"""`backend: cluster`: the ingress's generation backend over the disaggregated `MoECluster`.

One Serve replica owns the cluster's front (`MoECluster`: controller, expert shards, per-node KV
pools, prefill and decode worker actors). Each request runs through `RequestRouter` in a thread
and its deltas come back over an asyncio queue, with the same streaming contract as the engine
backend (first item: accepted or an error; then lists of deltas; cancelling aborts the sequence).
"""

from __future__ import annotations

import asyncio
import threading

from ray import serve

from raymoe.actors.handoff import WorkRequest
from raymoe.config import parse_config
from raymoe.engine.sampling_params import SamplingParams
from raymoe.errors import UnsupportedOperationError
from raymoe.serve.backend import delta_dict, error_item


def cluster_config(config):
    """raymoe.config settings -> raymoe.cluster.cluster.ClusterConfig."""
    from raymoe.cluster.cluster import ClusterConfig

    c = config.cluster
    return ClusterConfig(
        shards_per_node=c.shards_per_node, replicas=c.replicas, num_microbatches=c.num_microbatches,
        engine=config.engine.to_engine_config(), kv_pool_bytes=c.kv_pool_bytes,
        placement_policy=c.placement_policy, rebalance_interval_s=c.rebalance_interval_s,
        namespace="raymoe-serve",
    )  # fmt: skip


@serve.deployment(name="cluster")
class ClusterBackend:
    def __init__(self, config: dict, model_path: str):
        from raymoe.cluster.cluster import MoECluster

        self.config = parse_config(config)
        self.model_path = model_path
        self.cluster = MoECluster(model_path, cluster_config(self.config))
        self.max_pending = self.config.serve.max_queue_len
        self.active: set[str] = set()
        self.lock = threading.Lock()
        self.num_rejected = 0

    def info(self) -> dict:
        spec = self.cluster.spec
        return {"max_model_len": spec.max_position_embeddings, "vocab_size": spec.vocab_size,
                "model_path": self.model_path, "backend": "cluster"}  # fmt: skip

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        with self.lock:
            if len(self.active) >= self.max_pending:
                self.num_rejected += 1
                yield error_item("overloaded", f"{len(self.active)} requests in flight; retry shortly")
                return
            self.active.add(request_id)
        yield {"accepted": True}
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        request = WorkRequest(request_id, list(prompt_ids), params)
        thread = threading.Thread(target=self._run, args=(request, loop, queue), daemon=True)
        thread.start()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    yield error_item("invalid" if isinstance(item, ValueError) else "internal", str(item))
                    return
                finished = item.finished
                yield [delta_dict(item)]
        finally:
            if not finished:  # the client went away: stop its sequence on the workers
                self.cluster.router.cancel(request_id)
            with self.lock:
                self.active.discard(request_id)

    def _run(self, request: WorkRequest, loop, queue) -> None:
        try:
            for delta in self.cluster.router.run([request]):
                loop.call_soon_threadsafe(queue.put_nowait, delta)
        except Exception as e:  # handed to the stream, which answers with an error item
            loop.call_soon_threadsafe(queue.put_nowait, e)

    def stats(self) -> dict:
        import ray

        load = ray.get(self.cluster.controller.load.remote())
        return {"num_admitted": len(self.active), "num_engine_requests": len(self.active),
                "num_rejected": self.num_rejected, "max_queue_len": self.max_pending,
                "expert_load": [list(map(float, row)) for row in load]}  # fmt: skip

    def cluster_status(self) -> dict:
        import ray

        placement, _ = ray.get(self.cluster.controller.placement.remote())
        status = ray.get(self.cluster.controller.status.remote())
        stats = self.cluster.stats()
        workers = [{"kind": kind, **s} for kind in ("prefill", "decode") for s in stats[kind]]
        return {"backend": "cluster", "model": self.model_path, "placement_epoch": placement.epoch,
                "nodes": [{"node_id": n["NodeID"], "speed": n["Resources"].get("raymoe_speed", 1.0)}
                          for n in ray.nodes() if n["Alive"]],
                "workers": workers, "expert_load": self.stats()["expert_load"], "controller": status,
                "kv_pools": self.cluster.pool_stats()}  # fmt: skip

    def rebalance(self) -> int:
        import ray

        return ray.get(self.cluster.controller.rebalance.remote())

    def scale(self, *_args, **_kwargs) -> dict:
        raise UnsupportedOperationError("scaling workers of the cluster backend is not built yet")

    def __del__(self):
        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            cluster.shutdown()

