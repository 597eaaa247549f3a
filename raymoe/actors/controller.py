"""The controller's Ray actor: a named, detached, threaded shell over `raymoe.cluster.controller.Controller`,
and the calls that start, find and stop it."""

from __future__ import annotations

import threading
import time

import ray
import torch

from raymoe.actors.expert_shard import ExpertShard
from raymoe.cluster.controller import CALL_TIMEOUT_S, CONTROLLER_NAME, DEFAULT_NODE_WATCH_S, HEAD_RESOURCE, Controller
from raymoe.cluster.placement import Placement
from raymoe.logs import configure_actor


@ray.remote(num_cpus=0, max_concurrency=8)
class ControllerActor:
    """Thin Ray shell over `Controller` (threaded: a worker's shard_failed may arrive mid-apply)."""

    def __init__(self, model_path: str, options: dict):
        torch.set_num_threads(1)
        configure_actor()
        self.core = Controller(model_path, ExpertShard, **options)

    def ready(self) -> int:
        return self.core.placement()[0].epoch

    def placement(self):
        return self.core.placement()

    def status(self) -> dict:
        return self.core.status()

    def register_worker(self, worker_id: str, handle):
        return self.core.register_worker(worker_id, handle)

    def unregister_worker(self, worker_id: str) -> None:
        self.core.unregister_worker(worker_id)

    def report_load(self, worker_id: str, counts, dispatch: dict | None = None) -> None:
        self.core.report_load(worker_id, counts, dispatch)

    def load(self) -> list:
        return self.core.load().tolist()

    def report_requests(self, node_id: str, routing: dict) -> None:
        self.core.report_requests(node_id, routing)

    def apply(self, placement: Placement) -> int:
        return self.core.apply(placement)

    def rebalance(self, extra_replicas: int | None = None, policy: str | None = None, recent: bool = False) -> int:
        return self.core.rebalance(extra_replicas, policy, recent=recent)

    def start_schedule(self, interval_s: float) -> bool:
        """Rebalance every `interval_s` seconds from the load the workers report (idempotent)."""
        if getattr(self, "_schedule", None) is None:
            self._schedule = threading.Thread(target=self._rebalance_every, args=(interval_s,), daemon=True)
            self._schedule.start()
        return True

    def _rebalance_every(self, interval_s: float) -> None:
        while True:
            time.sleep(interval_s)
            if self.core.load().sum() > 0:  # nothing served: nothing to learn from
                try:
                    self.core.rebalance(reason=f"every {interval_s:g} s")
                except Exception as e:  # noqa: BLE001 (a shard died mid-apply: the next round retries)
                    self.core.sync_failed(e)

    def shard_failed(self, shard: int):
        return self.core.shard_failed(shard)

    def sync_nodes(self) -> list[dict]:
        return self.core.sync_nodes()

    def drain_node(self, node_id: str) -> list[dict]:
        return self.core.drain_node(node_id)

    def start_node_watch(self, interval_s: float = DEFAULT_NODE_WATCH_S) -> bool:
        """Read Ray's node table every `interval_s` seconds and follow nodes joining and leaving
        (`Controller.sync_nodes`); idempotent."""
        if getattr(self, "_node_watch", None) is None:
            self._node_watch = threading.Thread(target=self._watch_nodes, args=(interval_s,), daemon=True)
            self._node_watch.start()
        return True

    def _watch_nodes(self, interval_s: float) -> None:
        while True:
            time.sleep(interval_s)
            try:
                self.core.sync_nodes()
            except Exception as e:  # noqa: BLE001 (e.g. a joining node died mid-load: the next look retries)
                self.core.sync_failed(e)


def get_or_create_controller(
    model_path: str,
    *,
    namespace: str = "raymoe",
    name: str = CONTROLLER_NAME,
    timeout_s: float = CALL_TIMEOUT_S,
    node_watch_s: float | None = DEFAULT_NODE_WATCH_S,
    **options,
):
    """The named, detached controller of `namespace`, started if absent (options go to `Controller`;
    an existing controller keeps the options it was started with). node_watch_s: how often it
    reads Ray's node table to follow nodes joining and leaving (None: only on `sync_nodes` calls)."""
    handle = ControllerActor.options(
        name=name, namespace=namespace, lifetime="detached", get_if_exists=True, resources={HEAD_RESOURCE: 0.001}
    ).remote(str(model_path), options)  # on the head node: it outlives any worker node
    ray.get(handle.ready.remote(), timeout=timeout_s)
    if node_watch_s:
        ray.get(handle.start_node_watch.remote(node_watch_s), timeout=timeout_s)
    return handle


def shutdown_controller(namespace: str = "raymoe", name: str = CONTROLLER_NAME, timeout_s: float = 30.0) -> bool:
    """Kill the namespace's controller and its shards; False when there was none."""
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    try:
        _, shards = ray.get(handle.placement.remote(), timeout=timeout_s)
    except ray.exceptions.RayError:
        shards = []  # shards are owned by the controller: they die with it anyway
    ray.kill(handle)
    for shard in shards:
        ray.kill(shard)
    return True
