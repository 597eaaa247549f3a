"""Elasticity under load: throughput and latency through a node join, a graceful leave and a crash.

    python bench/elastic.py --out bench/out/elastic.json --plot docs/img/elastic.png
    python bench/elastic.py --smoke        # shorter phases (what tests/serve/test_elastic.py runs)

A local multi-node Ray cluster on 127.0.0.1 (`ray.cluster_utils.Cluster`: a head and node B),
raymoe's Serve application with `backend: cluster` on it, and a bounded Poisson load of streaming
completions over HTTP. Phases, each under load: steady; node C (twice as fast) joins; node B is
drained (Ray's node drain, which Serve follows, and the controller's) and removed; node C is
killed. Every request's streamed text is compared with the one-process engine's greedy text: a
token lost, doubled or changed shows as a mismatch.

Printed JSON: per-bucket throughput and p99 latencies over time, the phase times, the time from
the node join to its first served expert row, requests failed and mismatched (aim: zero), and the
scaling decisions and controller events the cluster recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

PROMPTS = ["The quick brown fox", "Once upon a time", "def main():", "In the beginning",
           "The capital of France is", "Mixture of experts models", "Dear diary, today", "import numpy as np"]  # fmt: skip
MODEL = "raymoe-builtin-moe"
HEAD = {"num_cpus": 4, "resources": {"raymoe_speed": 1, "node_head": 1}}
NODE_B = {"num_cpus": 3, "resources": {"raymoe_speed": 1, "node_b": 1}}
NODE_C = {"num_cpus": 3, "resources": {"raymoe_speed": 2, "node_c": 1}}
FAST_SCALING = {"upscale_delay_s": 1, "downscale_delay_s": 10, "metrics_interval_s": 0.5, "look_back_period_s": 3}


def app_config(port: int) -> dict:
    head = {"num_cpus": 0, "resources": {"node_head": 0.01}}  # the HTTP entry stays on the head node
    return {
        "backend": "cluster",
        "engine": {"max_num_seqs": 16, "max_num_batched_tokens": 256, "kv_cache_bytes": 64 << 20},
        "serve": {"port": port, "max_queue_len": 64},
        "ingress": head,
        "prefill": {"num_cpus": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": 2, **FAST_SCALING}},
        "decode": {"num_cpus": 0.5, "health_check_period_s": 2, "graceful_shutdown_timeout_s": 3,
                   "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_running_sequences": 4,
                                   **FAST_SCALING}},
        "cluster": {"replicas": 1, "kv_pool_bytes": 32 << 20},
    }  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- load ----------------------------------------------------------------------------------
def one_request(base_url: str, prompt: str, max_tokens: int, expected: str) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    record = {"sent": time.time(), "prompt": prompt, "first": None, "end": None, "tokens": 0, "error": None}
    text = ""
    try:
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=300) as r:
            if r.status_code != 200:
                record["error"] = f"HTTP {r.status_code}: {r.read().decode()[:200]}"
                return record
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    record["first"] = record["first"] or time.time()
                    text += chunk["choices"][0]["text"]
                if chunk.get("usage"):
                    record["tokens"] = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        record["error"] = f"{type(e).__name__}: {e}"
        return record
    record["end"], record["match"] = time.time(), text == expected
    return record


class Load:
    """Poisson arrivals at `rate`/s from a thread until stopped; at most `max_in_flight` at once."""

    def __init__(self, base_url: str, expected: dict, rate: float, max_tokens: int, max_in_flight: int = 12):
        self.base_url, self.expected, self.rate, self.max_tokens = base_url, expected, rate, max_tokens
        self.pool = ThreadPoolExecutor(max_in_flight)
        self.slots = threading.Semaphore(max_in_flight)
        self.futures, self.stopped = [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = random.Random(0)
        while not self.stopped.wait(rng.expovariate(self.rate)):
            self.slots.acquire()
            prompt = rng.choice(PROMPTS)
            future = self.pool.submit(one_request, self.base_url, prompt, self.max_tokens, self.expected[prompt])
            future.add_done_callback(lambda _: self.slots.release())
            self.futures.append(future)

    def start(self) -> Load:
        self.thread.start()
        return self

    def finish(self) -> list[dict]:
        self.stopped.set()
        self.thread.join()
        return [f.result() for f in self.futures]


# ----- cluster operations --------------------------------------------------------------------
def controller():
    import ray

    from raymoe.cluster.controller import CONTROLLER_NAME
    from raymoe.serve.cluster_setup import NAMESPACE

    return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)


def shard_stats() -> list[dict]:
    import ray

    _, shards = ray.get(controller().placement.remote())
    return ray.get([s.stats.remote() for s in shards], timeout=30)


def wait_first_served(node_id: str, since: float, timeout_s: float) -> float | None:
    """Seconds from `since` until a shard on `node_id` served its first row (None: not seen)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            served = [s["first_served_at"] for s in shard_stats() if s["node_id"] == node_id and s["first_served_at"]]
        except Exception:  # a shard being replaced mid-call: ask again
            served = []
        if served:
            return min(served) - since
        time.sleep(0.5)
    return None


def drain(cluster, node, address: str, deadline_s: int = 30) -> None:
    """Graceful leave: Ray's drain (Serve moves replicas away), the controller moves experts away,
    then the node is removed."""
    import ray
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=address)
    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    gcs.drain_node(node.node_id, reason, "raymoe elastic benchmark: graceful leave",
                   int(time.time() * 1000) + deadline_s * 1000)  # fmt: skip
    ctl = controller()
    if hasattr(ctl, "drain_node"):
        ray.get(ctl.drain_node.remote(node.node_id), timeout=120)
    time.sleep(deadline_s / 3)  # Serve starts replacements elsewhere and lets the old ones finish
    cluster.remove_node(node, allow_graceful=True)


# ----- the run -------------------------------------------------------------------------------
def expected_texts(max_tokens: int) -> dict:
    from raymoe.engine.llm import LLM
    from raymoe.engine.sampling_params import SamplingParams

    outs = LLM().generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0))
    return {p: o.text for p, o in zip(PROMPTS, outs)}


def run(phase_s: float, rate: float, max_tokens: int) -> dict:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # a local cluster: loopback only
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from raymoe.config import parse_config
    from raymoe.serve.app import APP_NAME, _wait_ready, build_app

    expected = expected_texts(max_tokens)
    cluster = Cluster(initialize_head=True, head_node_args=HEAD)
    node_b = cluster.add_node(**NODE_B)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}, log_to_driver=False)
    addresses = {n["NodeManagerAddress"] for n in ray.nodes()}
    port = free_port()
    # one HTTP proxy, on the head: the nodes share 127.0.0.1, and a proxy on a node that leaves
    # would take the connections the kernel gave it along
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(parse_config(app_config(port))), name=APP_NAME, route_prefix="/", blocking=False)
    _wait_ready(APP_NAME, 300)
    base_url, t0 = f"http://127.0.0.1:{port}", time.time()
    events: list[dict] = []

    def mark(kind: str, **info) -> None:
        events.append({"t": round(time.time() - t0, 2), "kind": kind, **info})

    load = Load(base_url, expected, rate, max_tokens).start()
    try:
        time.sleep(phase_s)
        mark("node_join")
        joined_at = time.time()
        node_c = cluster.add_node(**NODE_C)
        cluster.wait_for_nodes()
        join_to_first_expert_s = wait_first_served(node_c.node_id, joined_at, timeout_s=max(phase_s, 60))
        mark("first_expert_on_new_node", seconds=join_to_first_expert_s)
        time.sleep(phase_s)
        mark("graceful_leave")
        drain(cluster, node_b, cluster.address)
        time.sleep(phase_s)
        mark("crash")
        cluster.remove_node(node_c, allow_graceful=False)
        time.sleep(phase_s)
    finally:
        records = load.finish()
        mark("load_done")
        status = _admin(base_url)
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return report(records, events, t0, join_to_first_expert_s, status, addresses)


def _admin(base_url: str) -> dict:
    try:
        return httpx.get(f"{base_url}/admin/cluster", timeout=60).json()
    except httpx.HTTPError as e:
        return {"error": str(e)}


def percentile(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else None


def timeline(records: list[dict], t0: float, bucket_s: float) -> list[dict]:
    """Per bucket (by completion time): output tokens/s; p99 TTFT and TPOT of those requests."""
    done = [r for r in records if r["end"]]
    if not done:
        return []
    rows = []
    for b in range(int((max(r["end"] for r in done) - t0) // bucket_s) + 1):
        lo, hi = t0 + b * bucket_s, t0 + (b + 1) * bucket_s
        inside = [r for r in done if lo <= r["end"] < hi]
        tpot = [(r["end"] - r["first"]) / (r["tokens"] - 1) for r in inside if r["tokens"] > 1]
        rows.append({"t": round(b * bucket_s, 1), "tokens_per_s": sum(r["tokens"] for r in inside) / bucket_s,
                     "p99_ttft_s": percentile([r["first"] - r["sent"] for r in inside], 99),
                     "p99_tpot_s": percentile(tpot, 99)})  # fmt: skip
    return rows


def phases(records: list[dict], events: list[dict], t0: float) -> dict:
    """Per phase (between the marks): output tokens/s, p99 TTFT and TPOT of the requests ending in it."""
    at = {e["kind"]: e["t"] for e in events}
    bounds = {"steady": (0.0, at["node_join"]), "after_join": (at["node_join"], at["graceful_leave"]),
              "after_leave": (at["graceful_leave"], at["crash"]), "after_crash": (at["crash"], at["load_done"])}  # fmt: skip
    out = {}
    for name, (lo, hi) in bounds.items():
        inside = [r for r in records if r["end"] and lo <= r["end"] - t0 < hi]
        tpot = [(r["end"] - r["first"]) / (r["tokens"] - 1) for r in inside if r["tokens"] > 1]
        out[name] = {"seconds": round(hi - lo, 1), "requests": len(inside),
                     "tokens_per_s": round(sum(r["tokens"] for r in inside) / max(hi - lo, 1e-9), 1),
                     "p99_ttft_s": percentile([r["first"] - r["sent"] for r in inside], 99),
                     "p99_tpot_s": percentile(tpot, 99)}  # fmt: skip
    ends = sorted(r["end"] - t0 for r in records if r["end"] and r["end"] - t0 >= at["crash"])
    gaps = [b - a for a, b in zip([at["crash"]] + ends, ends)]
    out["after_crash"]["longest_gap_without_completions_s"] = round(max(gaps, default=0.0), 1)
    return out


def report(records, events, t0, join_to_first_expert_s, status, addresses) -> dict:
    failed = [r for r in records if r["error"]]
    mismatched = [r for r in records if not r["error"] and not r.get("match")]
    return {
        "requests": len(records), "failed": len(failed), "mismatched": len(mismatched),
        "failures": [{"sent_t": round(r["sent"] - t0, 1), "error": r["error"][:300]} for r in failed][:10],
        "mismatched_prompts": [r["prompt"] for r in mismatched][:10],
        "join_to_first_expert_s": join_to_first_expert_s, "events": events, "node_addresses": sorted(addresses),
        "phases": phases(records, events, t0), "timeline": timeline(records, t0, bucket_s=2.0),
        "scaling": status.get("scaling"), "controller": status.get("controller"),
        "resumed_sequences": (status.get("front") or {}).get("resumed_sequences"),
    }  # fmt: skip


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["timeline"]
    t = [r["t"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(t, [r["tokens_per_s"] for r in rows], marker=".")
    top.set_ylabel("output tokens/s")
    bottom.plot(t, [r["p99_ttft_s"] for r in rows], marker=".", label="p99 time to first token")
    bottom.plot(t, [r["p99_tpot_s"] for r in rows], marker=".", label="p99 time per output token")
    bottom.set_ylabel("seconds")
    bottom.set_xlabel("time since the load started (s)")
    bottom.legend()
    for ax in (top, bottom):
        for e in result["events"]:
            if e["kind"] in ("node_join", "graceful_leave", "crash"):
                ax.axvline(e["t"], color="grey", linestyle="--")
                if ax is top:
                    ax.text(e["t"], ax.get_ylim()[1] * 0.95, e["kind"].replace("_", " "), fontsize=8)
    fig.suptitle(f"raymoe elasticity: {result['requests']} requests, {result['failed']} failed, "
                 f"{result['mismatched']} mismatched")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="8 s phases (about two minutes in all)")
    parser.add_argument("--phase-s", type=float, default=None, help="seconds of load in each phase")
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second (Poisson)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--plot", default=None, help="PNG of throughput and p99 latencies over time")
    args = parser.parse_args(argv)
    phase_s = args.phase_s or (8.0 if args.smoke else 30.0)
    result = run(phase_s, args.rate, args.max_tokens)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
