"""PrefillWorker: runs prompts (attention + router here, experts on shards), leaves their KV in
the KV pool under content keys, and hands back the first token.

A prompt whose leading blocks are already in the pool (a shared prefix) fetches them instead of
computing them; the count is reported so tests and metrics can see the skipped prefill.

A request with chunk reuse (`SamplingParams.chunk_reuse`) assembles its KV from chunk entries of
the node's pool (computing and storing the ones missing), then publishes its blocks under the
request's salt (`raymoe.engine.chunks`); the decode worker imports them as it imports any prefix.

With a direct KV transport (`ClusterConfig.kv_transport` gloo or nccl) the worker also keeps each
handed-off request's blocks until the front takes them with `take_kv`, and publishes to the pool
on a background thread (`raymoe.cluster.kv_direct`).
"""

from __future__ import annotations

import dataclasses
import threading

import ray

from raymoe.cluster.handoff import Handoff, WorkRequest
from raymoe.actors.worker_model import WorkerShell, die
from raymoe.cluster.dispatch import ShardFailureError
from raymoe.cluster.kv_direct import KeptKV, Publisher
from raymoe.engine.chunks import request_salt
from raymoe.engine.kv_transfer import block_numel
from raymoe.engine.llm_engine import LLMEngine


class PrefillCore:
    def __init__(self, engine: LLMEngine, pool, chunk_store=None, keep_kv: bool = False):
        """engine: a token-ids engine (see worker_model.build_engine); pool: a KVPoolClient-like
        object with get_blocks(keys) / put_blocks(keys, tensors) / contains(keys); chunk_store: where
        chunk KV lives (`raymoe.engine.chunks.ChunkStore`, e.g. this node's KVPoolClient);
        keep_kv: keep handed-off requests' blocks for `take_kv` (a direct KV transport)."""
        self.engine, self.pool = engine, pool
        self.kept = KeptKV() if keep_kv else None
        self.publisher = Publisher(self._put_new) if keep_kv else None  # off the hand-off's path
        if chunk_store is not None:
            engine.set_chunk_store(chunk_store)
        self.stats = {"prompts": 0, "prompt_tokens": 0, "prefix_hit_tokens": 0}

    def prefill(self, requests: list[WorkRequest]) -> list[Handoff]:
        """Run the prompts together (continuous batching, chunked) until each has its first token."""
        hits = {r.request_id: self._admit(r) for r in requests}
        first: dict[str, tuple[int, str | None]] = {}
        scores: dict[str, tuple] = {}  # request id -> (logprobs, prompt_logprobs) of those that asked
        while len(first) < len(requests):
            for delta in self.engine.step():
                if delta.request_id in hits and delta.token_ids:
                    first[delta.request_id] = (delta.token_ids[0], delta.finish_reason)
                    scores[delta.request_id] = (delta.logprobs, delta.prompt_logprobs)
        block_size = self.engine.config.block_size
        finish = {r.request_id: self._real_finish(r, first[r.request_id][1]) for r in requests}
        for r in requests:
            salt = request_salt(r.prompt_token_ids, r.params.chunk_reuse, block_size)
            keys, blocks = self._publish(r.prompt_token_ids + r.output_token_ids + [first[r.request_id][0]], salt)
            if self.kept is not None and finish[r.request_id] is None:  # a decode worker takes it over
                self.kept.keep(r.request_id, keys, blocks)
        tally = self.engine.model.tally
        return [Handoff(r.request_id, first[r.request_id][0], finish[r.request_id],
                        hits[r.request_id], routing=tally.pop(r.request_id) if tally else None,
                        logprobs=scores[r.request_id][0], prompt_logprobs=scores[r.request_id][1])
                for r in requests]  # fmt: skip

    def take_kv(self, request_ids: list[str], device: str) -> dict:
        """The kept blocks of these requests, dropped here (`KeptKV.take`): {"keys": [n],
        "blocks": [n, block_numel] on `device`}."""
        cache = self.engine.model_runner.kv_cache
        return self.kept.take(request_ids, block_numel(cache), cache[0][0].dtype, device)

    def _real_finish(self, r: WorkRequest, reason: str | None) -> str | None:
        """The engine stopped every request at one token; only some are really done."""
        num_tokens = len(r.prompt_token_ids) + len(r.output_token_ids) + 1
        num_outputs = len(r.output_token_ids) + 1
        if reason == "length" and num_outputs < r.params.max_tokens and num_tokens < self.engine.max_model_len:
            return None
        return reason

    def _admit(self, r: WorkRequest) -> int:
        tokens = r.prompt_token_ids + r.output_token_ids
        num_blocks = self.engine.import_prefix(tokens, self.pool.get_blocks)
        # One token now: the decode worker continues; the real limits are checked there.
        params = dataclasses.replace(r.params, max_tokens=min(r.params.max_tokens, len(r.output_token_ids) + 1))
        self.engine.add_request(r.prompt_token_ids, params, r.request_id, r.output_token_ids)
        hit_tokens = num_blocks * self.engine.config.block_size
        self.stats["prompts"] += 1
        self.stats["prompt_tokens"] += len(tokens)
        self.stats["prefix_hit_tokens"] += hit_tokens
        return hit_tokens

    def chunk_stats(self) -> dict:
        """The engine's chunk-reuse counters (raymoe.engine.chunk_work.Blender)."""
        return dict(self.engine.blender.stats)

    def _publish(self, token_ids: list[int], salt=None) -> tuple[list[str], list]:
        """Put the sequence's computed full blocks into the pool (in the background under a direct
        KV transport); returns all of them (keys, exported blocks)."""
        keys, blocks = self.engine.export_prefix(token_ids, salt)  # copies: the cache may change next
        if keys:
            (self.publisher.submit if self.publisher else self._put_new)(keys, blocks)
        return keys, blocks

    def _put_new(self, keys: list[str], blocks: list) -> None:
        """The blocks the pool lacks, into the pool."""
        have = self.pool.contains(keys)
        new = [(k, b) for k, b, h in zip(keys, blocks, have) if not h]
        if new:
            self.pool.put_blocks([k for k, _ in new], [b for _, b in new])


class PrefillWorker(WorkerShell):
    """Ray actor shell over PrefillCore (created with ray.remote by the cluster)."""

    def __init__(self, model_path: str, config, namespace: str):
        from raymoe.actors.remote_backend import connect_experts, pool_set

        self.lock = threading.Lock()
        self.experts = connect_experts(namespace, model_path, config)
        from raymoe.actors.worker_model import build_engine

        pools = pool_set(namespace, config)
        self.kv_transport = config.kv_transport
        self.core = PrefillCore(build_engine(model_path, config.engine, self.experts, config.num_microbatches),
                                pools, pools.client(pools.node_id), keep_kv=config.kv_transport != "pool")  # fmt: skip

    def prefill(self, requests: list[WorkRequest]) -> list[Handoff]:
        with self.lock:  # one batch of prompts at a time through the engine
            try:
                return self.core.prefill(requests)
            except (ShardFailureError, ray.exceptions.RayError) as e:  # crash-only: see worker_model.die
                die(f"prefill failed: {e!r}")

    def take_kv(self, request_ids: list[str]) -> dict:
        """Called with `.options(tensor_transport=kv_transport)`: Ray moves the returned tensor over
        the KV group (`raymoe.cluster.kv_direct`); gloo sends host tensors, NCCL device ones."""
        device = "cpu" if self.kv_transport == "gloo" else self.core.engine.model_runner.kv_cache[0][0].device
        return self.core.take_kv(request_ids, device)  # not under self.lock: never waits for a prefill

    def set_placement(self, placement, handles) -> int:
        with self.lock:  # between prefills: a step boundary
            self.experts.set_placement(placement, handles)
        return placement.epoch

    def stats(self) -> dict:
        return {**self.core.stats, **self.core.chunk_stats(), "dispatch": self.experts.count_summary()}
