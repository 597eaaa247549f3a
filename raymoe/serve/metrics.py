"""Prometheus metrics of the ingress, in their own registry (one per ingress replica).

Request counts and latencies are observed where the ingress sees them; queue depths and engine
counters are read from the backend at scrape time, so they are never stale.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServeMetrics:
    def __init__(self, model_name: str = ""):
        r = self.registry = CollectorRegistry()
        self.model_name = model_name
        self.info = Gauge("raymoe_info", "what this server runs (always 1)", ["model", "backend"], registry=r)
        self.requests = Counter("raymoe_requests", "HTTP requests by route and status code", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("raymoe_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("raymoe_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("raymoe_time_to_first_token_seconds", "request arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tpot = Histogram("raymoe_time_per_output_token_seconds", "mean gap between output tokens",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("raymoe_request_latency_seconds", "request arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.in_flight = Gauge("raymoe_ingress_in_flight_requests", "requests this ingress is serving", registry=r)
        self.queue_depth = Gauge("raymoe_queue_depth", "requests admitted by the backend, not finished", registry=r)
        self.running = Gauge("raymoe_running_requests", "requests in the engine (batch or waiting)", registry=r)
        self.rejected = Gauge("raymoe_rejected_requests", "requests turned away by full queues (backend total)", registry=r)
        self.finished = Gauge("raymoe_finished_requests", "requests the backend finished (backend total)", registry=r)
        self.kv_usage = Gauge("raymoe_kv_cache_usage", "share of KV blocks in use", registry=r)
        self.local_activation = Gauge("raymoe_local_activation_rate",
                                      "share of token-expert pairs served on the token's own node", registry=r)  # fmt: skip
        self.expert_load = Gauge("raymoe_expert_load", "recent tokens per expert", ["layer", "expert"], registry=r)
        self.spec = SpecGauges(r)
        self.chunks = ChunkCounters(r)
        self.cluster = ClusterGauges(r)

    def observe_request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def observe_generation(self, start: float, first: float | None, last: float | None, num_tokens: int) -> None:
        if first is None:
            return
        self.ttft.observe(first - start)
        self.e2e.observe(last - start)
        self.generated_tokens.inc(num_tokens)
        if num_tokens > 1:
            self.tpot.observe((last - first) / (num_tokens - 1))

    def update_backend(self, stats: dict) -> None:
        self.queue_depth.set(stats.get("num_admitted", 0))
        self.running.set(stats.get("num_engine_requests", 0))
        self.rejected.set(stats.get("num_rejected", 0))
        self.finished.set(stats.get("num_finished", 0))
        if "backend" in stats:
            self.info.labels(model=self.model_name, backend=stats["backend"]).set(1)
        if stats.get("num_kv_blocks"):
            self.kv_usage.set(1 - stats["num_free_kv_blocks"] / stats["num_kv_blocks"])
        # one process holds every expert: every activation is local
        self.local_activation.set(stats.get("local_activation_rate", 1.0))
        for layer, row in enumerate(stats.get("expert_load") or []):
            for expert, load in enumerate(row):
                self.expert_load.labels(layer=str(layer), expert=str(expert)).set(load)
        self.spec.update(stats.get("speculative") or {})
        self.chunks.update(stats.get("chunks") or {})
        self.cluster.update(stats)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SpecGauges:
    """Speculative decoding (engine.speculative): how many draft tokens were verified and kept, the
    acceptance rate and the mean accepted length (tokens a sequence gets per verification step,
    1 = no gain), summed over the backend's engines (every decode worker with backend: cluster)."""

    FIELDS = {
        "num_draft_tokens": ("raymoe_spec_draft_tokens", "draft tokens verified (backend total)"),
        "num_accepted_tokens": ("raymoe_spec_accepted_tokens", "draft tokens kept (backend total)"),
        "acceptance_rate": ("raymoe_spec_acceptance_rate", "kept / verified draft tokens"),
        "mean_accepted_tokens": ("raymoe_spec_mean_accepted_tokens",
                                 "tokens per sequence per verification step, the decode token included"),
    }  # fmt: skip

    def __init__(self, r: CollectorRegistry):
        self.gauges = {k: Gauge(name, doc, registry=r) for k, (name, doc) in self.FIELDS.items()}

    def update(self, spec: dict) -> None:
        for key, gauge in self.gauges.items():
            gauge.set(spec.get(key, 0))


class ChunkCounters:
    """Chunk reuse (`raymoe_chunks`, docs/chunks.md): the engine's `chunk_stats()` totals as
    Prometheus counters (`_total`), read from the backend at scrape time (backend: engine only: the
    cluster backend's stats lack its prefill workers' counters, /admin/cluster shows them per worker).
    Reused = placed - recomputed: chunk tokens whose KV came from the pool as placed."""

    FIELDS = {
        "blended_requests": ("raymoe_chunk_requests", "requests whose chunks were placed (blended)"),
        "chunk_tokens_placed": ("raymoe_chunk_tokens_placed", "chunk tokens placed from stored chunk KV"),
        "chunk_tokens_reused": ("raymoe_chunk_tokens_reused", "placed chunk tokens kept, not recomputed"),
        "chunk_tokens_recomputed": ("raymoe_chunk_tokens_recomputed", "placed chunk tokens recomputed (the share)"),
        "chunk_prefill_tokens": ("raymoe_chunk_tokens_computed", "chunk tokens computed on their own (not stored yet)"),
        "computed_tokens": ("raymoe_computed_tokens", "prefill + decode tokens computed, blends as whole tokens"),
    }  # fmt: skip

    def __init__(self, r: CollectorRegistry):
        self.values: dict[str, float] = {}
        r.register(self)

    def update(self, chunks: dict) -> None:
        values = dict(chunks)
        if "chunk_tokens_placed" in values:
            values["chunk_tokens_reused"] = values["chunk_tokens_placed"] - values.get("chunk_tokens_recomputed", 0)
        self.values = values

    def collect(self):
        """Nothing without counters (backend: cluster), rather than zeros that look measured."""
        if not self.values:
            return
        for key, (name, doc) in self.FIELDS.items():
            yield CounterMetricFamily(name, doc, value=self.values.get(key, 0))


class ClusterGauges:
    """Nodes and replicas per deployment (both backends); with backend: cluster also shards, epoch,
    and counts of scaling decisions, controller events and resumed sequences (the same facts
    /admin/cluster and `raymoe status` show)."""

    def __init__(self, r: CollectorRegistry):
        self.nodes = Gauge("raymoe_nodes", "live Ray nodes", registry=r)
        self.shards = Gauge("raymoe_expert_shards", "expert shards", registry=r)
        self.epoch = Gauge("raymoe_placement_epoch", "the expert placement's epoch", registry=r)
        self.replicas = Gauge("raymoe_replicas", "running replicas per deployment", ["deployment"], registry=r)
        self.decisions = Gauge("raymoe_scaling_decisions", "scaling decisions logged (recent window)",
                               ["deployment"], registry=r)  # fmt: skip
        self.events = Gauge("raymoe_controller_events", "controller events kept, by kind", ["kind"], registry=r)
        self.resumed = Gauge("raymoe_resumed_sequences", "sequences resumed on another worker", registry=r)
        per_node = [("local_activation_rate", "share of token-expert pairs served on the token's node"),
                    ("rows_crossing_process_per_token", "expert rows sent to another process, per token"),
                    ("rows_crossing_node_per_token", "expert rows sent to another node, per token")]  # fmt: skip
        self.dispatch = {k: Gauge(f"raymoe_node_{k}", f"{doc} (decode workers of the node)", ["node"], registry=r)
                         for k, doc in per_node}  # fmt: skip

    def update(self, stats: dict) -> None:
        """Both backends report nodes and replicas; the rest is backend: cluster's."""
        self.nodes.set(stats.get("nodes", 0))
        for name, count in stats.get("replicas", {}).items():
            self.replicas.labels(deployment=name).set(count)
        if "placement_epoch" not in stats:  # the engine backend: no shards, no placement
            return
        self.shards.set(stats.get("expert_shards", 0))
        self.epoch.set(stats["placement_epoch"])
        self.resumed.set(stats.get("resumed_sequences", 0))
        for name, count in stats.get("scaling_decisions", {}).items():
            self.decisions.labels(deployment=name).set(count)
        for kind, count in stats.get("controller_events", {}).items():
            self.events.labels(kind=kind).set(count)
        for node, counts in stats.get("dispatch", {}).items():
            for key, gauge in self.dispatch.items():
                if counts.get(key) is not None:
                    gauge.labels(node=node).set(counts[key])
