"""`MoECluster`: the disaggregated cluster on a running Ray cluster, as one Python object.

    cluster = MoECluster(model_path, ClusterConfig(num_shards_per_node=1, num_decode_workers=2))
    outs = cluster.generate(prompts, SamplingParams(max_tokens=32))
    cluster.shutdown()

It starts (or joins) the controller and its expert shards, then prefill and decode workers; the
KV pools start on demand, one per node. Requests go through `RequestRouter` (cluster/front.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raymoe.actors.decode import DecodeWorker
from raymoe.actors.prefill import PrefillWorker
from raymoe.cluster.cluster import ClusterConfig
from raymoe.cluster.front import RequestRouter
from raymoe.cluster.handoff import WorkRequest
from raymoe.engine.llm import params_per_prompt
from raymoe.engine.llm_engine import RequestOutput
from raymoe.engine.sampling_params import SamplingParams
from raymoe.errors import ConfigError
from raymoe.model.spec import load_spec

READY_TIMEOUT_S = 300
# generate() returns whole outputs: its polls gather a worker's tokens over this long (about a few
# decode steps) rather than one round trip per step, whose cost shares the cores with the steps
GENERATE_LINGER_S = 0.05


class MoECluster:
    def __init__(self, model: str | Path | None = None, config: ClusterConfig | None = None, tokenizer=None):
        from raymoe.actors.controller import get_or_create_controller

        if not ray.is_initialized():
            raise ConfigError("start or join Ray first (ray.init), then build the MoECluster")
        if model is None:
            from raymoe.model.builtin import builtin_model_path

            model = builtin_model_path()
        self.model_path, self.config = str(model), config or ClusterConfig()
        self.spec = load_spec(self.model_path)
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(self.model_path)
        c = self.config
        self.controller = get_or_create_controller(
            self.model_path, namespace=c.namespace, dtype=c.engine.dtype, device=c.engine.device,
            shard_num_gpus=c.shard_num_gpus,
            shards_per_node=c.shards_per_node, num_shards=c.num_shards, replicas=c.replicas,
            policy=c.placement_policy, node_watch_s=c.node_watch_s,
        )  # fmt: skip
        if c.rebalance_interval_s:
            ray.get(self.controller.start_schedule.remote(c.rebalance_interval_s))
        self.prefill = [self._start(PrefillWorker, c.prefill_resources) for _ in range(c.num_prefill_workers)]
        if c.decode_nodes:
            self.decode = [self._start(DecodeWorker, c.decode_resources, node) for node in c.decode_nodes]
        else:
            self.decode = [self._start(DecodeWorker, c.decode_resources) for _ in range(c.num_decode_workers)]
        ray.get([w.ready.remote() for w in self.prefill + self.decode], timeout=READY_TIMEOUT_S)
        if c.kv_transport != "pool":  # formed here: the front, which passes the KV refs on, runs in this process
            from raymoe.cluster.kv_direct import form_kv_group

            form_kv_group(self.prefill + self.decode, c.kv_transport, c.namespace)
        self.prefill_nodes = ray.get([w.node_id.remote() for w in self.prefill])
        self.decode_nodes = ray.get([w.node_id.remote() for w in self.decode])
        eos = tuple(self.spec.eos_token_ids) + tuple(getattr(self.tokenizer, "eos_token_ids", ()))
        max_len = self.spec.max_position_embeddings
        self.router = RequestRouter(list(zip(self.prefill, self.prefill_nodes)), self.decode, self.tokenizer,
                                    tuple(sorted(set(eos))), max_len, seating=self._seating(),
                                    decode_nodes=self.decode_nodes, reseat_every_s=c.reseat_every_s,
                                    kv_transport=c.kv_transport)  # fmt: skip

    def _seating(self):
        """Speculative token placement at the front, if on (see ClusterConfig.token_placement)."""
        from raymoe.cluster.seating import Seating
        from raymoe.policies.registry import REGISTRY

        c = self.config
        on = c.token_placement
        if on is None:
            on = c.placement_policy is not None and REGISTRY[c.placement_policy].is_token_placement
        return Seating(self.controller, self.spec.moe_layer_ids, self.spec.num_experts) if on else None

    def _start(self, cls, resources: dict | None, node_id: str | None = None):
        strategy = NodeAffinitySchedulingStrategy(node_id, soft=False) if node_id else None
        direct = self.config.kv_transport != "pool"  # RDT methods (take_kv) need it at class level
        actor = (ray.remote(enable_tensor_transport=True)(cls) if direct else ray.remote(cls)).options(
            num_cpus=self.config.worker_num_cpus, num_gpus=self.config.worker_num_gpus, resources=resources or {},
            max_concurrency=8, max_restarts=0,
            scheduling_strategy=strategy,
        )  # fmt: skip
        return actor.remote(self.model_path, self.config, self.config.namespace)

    # ----- requests ----------------------------------------------------------------------------
    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order (token ids and text)."""
        requests = self._requests(prompts, params)
        results = {r.request_id: RequestOutput(r.request_id, r.prompt_token_ids) for r in requests}
        for delta in self.router.run(requests, GENERATE_LINGER_S):
            total = results[delta.request_id]
            total.token_ids.extend(delta.token_ids)
            total.text += delta.text
            total.finished, total.finish_reason = delta.finished, delta.finish_reason
        return [results[r.request_id] for r in requests]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        yield from self.router.run(self._requests([prompt], params))

    def _requests(self, prompts, params) -> list[WorkRequest]:
        params = params_per_prompt(params, len(prompts))
        return [WorkRequest(f"req-{uuid.uuid4().hex[:12]}", self._encode(p), sp) for p, sp in zip(prompts, params)]

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("this model folder has no tokenizer: pass prompts as token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    # ----- operations --------------------------------------------------------------------------
    def pool_stats(self) -> dict[str, dict]:
        """node id -> its KV pool's statistics (pools that were started)."""
        from raymoe.actors.kv_pool import pool_name

        stats = {}
        for node in ray.nodes():
            try:
                pool = ray.get_actor(pool_name(node["NodeID"]), namespace=self.config.namespace)
            except ValueError:
                continue
            stats[node["NodeID"]] = ray.get(pool.stats.remote())
        return stats

    def stats(self) -> dict:
        return {
            "prefill": ray.get([w.stats.remote() for w, _ in self.router.prefill]),  # the live ones
            "decode": ray.get([w.stats.remote() for w in self.router.decode]),
            "resumed_sequences": self.router.num_resumed,
            "reseated_sequences": self.router.num_reseated,
            "prefill_retries": self.router.num_prefill_retries,
            "kv_fallbacks": self.router.num_kv_fallbacks,  # direct KV submits that went through the pool
        }

    def shutdown(self) -> None:
        """Stop workers, shards, pools and the controller of this namespace."""
        from raymoe.actors.controller import shutdown_controller
        from raymoe.actors.kv_pool import pool_name

        if self.config.kv_transport != "pool":
            from raymoe.cluster.kv_direct import forget_kv_group

            forget_kv_group(self.config.namespace)
        for w in self.prefill + self.decode:
            ray.kill(w)
        shutdown_controller(self.config.namespace)
        for node in ray.nodes():
            try:
                ray.kill(ray.get_actor(pool_name(node["NodeID"]), namespace=self.config.namespace))
            except ValueError:  # no pool was started on that node
                pass


def _load_tokenizer(path: str):
    from raymoe.model.tokenizer import Tokenizer

    if not (Path(path) / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_dir(path)
