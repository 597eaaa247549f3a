"""`backend: cluster`: the ingress's generation backend over the prefill and decode deployments.

This deployment is the front: it admits requests (bounded), runs each through `ServeFront`
(prefill deployment -> KV pool -> decode deployment, resumed on another replica when one is lost)
and streams the deltas back with the same contract as the engine backend (first item: accepted or
an error; then lists of deltas; cancelling aborts the sequence). It also answers the admin calls:
cluster status (controller, shards, workers, scaling decisions), rebalance, and scale.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ray import serve

from raymoe.cluster.handoff import WorkRequest
from raymoe.config import parse_config
from raymoe.engine.sampling_params import SamplingParams
from raymoe.errors import ConfigError
from raymoe.model.spec import load_spec
from raymoe.serve import autoscale
from raymoe.serve.backend import delta_dict, error_item
from raymoe.serve.cluster_front import ServeFront
from raymoe.serve.cluster_setup import ensure_controller
from raymoe.serve.ray_state import deployments as _deployments
from raymoe.serve.ray_state import live_nodes as _nodes

STATUS_TIMEOUT_S = 10


@serve.deployment(name="cluster")
class ClusterBackend:
    def __init__(self, config: dict, model_path: str, prefill, decode):
        self.config = parse_config(config)
        self.model_path = model_path
        self.spec = load_spec(model_path)
        self.controller = ensure_controller(self.config, model_path)
        self.prefill, self.decode = prefill, decode
        tokenizer = _load_tokenizer(model_path)
        eos = tuple(self.spec.eos_token_ids) + tuple(getattr(tokenizer, "eos_token_ids", ()))
        self.front = ServeFront(prefill, decode, tokenizer, tuple(sorted(set(eos))), self.spec.max_position_embeddings)
        self.max_pending = self.config.serve.max_queue_len
        self.active: set[str] = set()
        self.num_rejected = 0
        self.num_finished = 0

    def info(self) -> dict:
        return {"max_model_len": self.spec.max_position_embeddings, "vocab_size": self.spec.vocab_size,
                "model_path": self.model_path, "backend": "cluster"}  # fmt: skip

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        if len(self.active) >= self.max_pending:
            self.num_rejected += 1
            yield error_item("overloaded", f"{len(self.active)} requests in flight; retry shortly")
            return
        self.active.add(request_id)
        yield {"accepted": True}
        try:
            async for delta in self.front.run_samples(WorkRequest(request_id, list(prompt_ids), params)):
                yield [delta_dict(delta)]
            self.num_finished += 1
        except Exception as e:  # handed to the stream, which answers with an error item
            yield error_item("invalid" if isinstance(e, ValueError) else "internal", str(e))
        finally:
            self.active.discard(request_id)

    # ----- operations --------------------------------------------------------------------------
    async def health(self) -> dict:
        """Ready when the controller answers, every shard is alive, and each deployment has a live worker."""
        status = await asyncio.wait_for(self.controller.status.remote(), STATUS_TIMEOUT_S)
        _, shards = await asyncio.wait_for(self.controller.placement.remote(), STATUS_TIMEOUT_S)
        await asyncio.wait_for(asyncio.gather(*[s.ping.remote() for s in shards]), STATUS_TIMEOUT_S)
        for name, handle in (("prefill", self.prefill), ("decode", self.decode)):
            await asyncio.wait_for(handle.check_health.remote(), STATUS_TIMEOUT_S)
        return {"placement_epoch": status["epoch"], "shards": len(shards)}

    async def stats(self) -> dict:
        load, controller = await asyncio.gather(self.controller.load.remote(), self.controller.status.remote())
        return {"backend": "cluster", "num_admitted": len(self.active), "num_engine_requests": len(self.active),
                "num_rejected": self.num_rejected, "num_finished": self.num_finished,
                "max_queue_len": self.max_pending, "resumed_sequences": self.front.stats["resumed"],
                "prefill_retries": self.front.stats["prefill_retries"],
                "expert_load": [list(map(float, row)) for row in load], **_cluster_counts(controller),
                "speculative": {"method": self.config.engine.speculative, **controller.get("speculative", {})}}  # fmt: skip

    async def cluster_status(self) -> dict:
        placement, _ = await self.controller.placement.remote()
        controller = await self.controller.status.remote()
        return {"backend": "cluster", "model": self.model_path, "placement_epoch": placement.epoch,
                "nodes": _nodes(), "workers": await self._workers(), "controller": controller,
                "expert_load": (await self.stats())["expert_load"], "deployments": _deployments(),
                "front": {"resumed_sequences": self.front.stats["resumed"], "active": len(self.active),
                          "prefill_retries": self.front.stats["prefill_retries"]},
                "scaling": {d: autoscale.recent_decisions(d) for d in ("prefill", "decode")}}  # fmt: skip

    async def _workers(self) -> list[dict]:
        """One stats entry per live replica of each deployment (sampled through the handles)."""
        workers: dict[str, dict] = {}
        for handle, count in ((self.prefill, _replicas("prefill")), (self.decode, _replicas("decode"))):
            for _ in range(max(2 * count, 1)):  # the router spreads calls: sample until each is seen
                try:
                    s = await asyncio.wait_for(handle.worker_stats.remote(), STATUS_TIMEOUT_S)
                except Exception:
                    continue
                workers[s["replica"] or s["kind"]] = s
        return list(workers.values())

    async def rebalance(self) -> int:
        return await self.controller.rebalance.remote()

    def scale(self, deployment: str, num_replicas: int | None) -> dict:
        """Pin a deployment's replica count (None: give it back to the autoscaler)."""
        bounds = getattr(self.config, deployment).autoscaling
        if num_replicas is not None and not bounds.min_replicas <= num_replicas <= bounds.max_replicas:
            raise ConfigError(f"{deployment} may run {bounds.min_replicas}..{bounds.max_replicas} replicas "
                              f"(config {deployment}.autoscaling); asked for {num_replicas}")  # fmt: skip
        autoscale.set_override(deployment, num_replicas)
        return {"deployment": deployment, "num_replicas": num_replicas}


def _cluster_counts(controller: dict) -> dict:
    """What /metrics shows of the cluster: nodes, shards, epoch, replicas, decisions and events."""
    events: dict[str, int] = {}
    for e in controller.get("events", []):
        events[e["kind"]] = events.get(e["kind"], 0) + 1
    return {"nodes": len(_nodes()), "expert_shards": len(controller.get("shards", [])),
            "placement_epoch": controller.get("epoch", 0),
            "replicas": {name: d["running"] for name, d in _deployments().items()},
            "scaling_decisions": {d: len(autoscale.recent_decisions(d)) for d in ("prefill", "decode")},
            "controller_events": events, "dispatch": controller.get("dispatch", {})}  # fmt: skip


def _replicas(deployment: str) -> int:
    return _deployments().get(deployment, {}).get("running", 1)


def _load_tokenizer(path: str):
    from raymoe.model.tokenizer import Tokenizer

    if not (Path(path) / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_dir(path)
