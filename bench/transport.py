"""Worker -> expert shards -> worker round trip on CPU: which transport should dispatch use?

    python bench/transport.py [--iters 40] [--rows 64 128 256 512] [--out bench/out/transport.json]

One decode-step-shaped round trip: `rows` sorted rows x hidden 256 (float32), split evenly over
2 `ExpertShard` actors (4 experts each, intermediate 32 so compute is small; the shards' own compute
time is reported beside the wall time). Methods, all in one run on one local Ray cluster of 2 nodes
(the caller on the head node, one shard on each node):
- actor_call_plain (baseline): one actor call per slice with a torch tensor argument and return
  (`ActorCallTransport(inline=False)`); slices over 100 KiB go through the object store;
- actor_call: `ActorCallTransport`, the default: rows as raw byte chunks under Ray's inline limit;
- actor_call_plain_from_actor, actor_call_from_actor: the same two, called from inside an actor
  (where a decode worker calls from);
- gloo_p2p: `CollectiveTransport(backend="gloo")` (ray.util.collective send/recv through
  torch.distributed) from inside an actor;
- compiled_graph: a Ray Compiled Graph (`ray.dag`, `experimental_compile()`) with the two shards'
  `run` as nodes, executed from the driver; torn down with a bounded wait (teardown can hang).
Prints one JSON object: per method and row count the median and p90 round-trip milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HIDDEN, EXPERTS = 256, 8
CKPT_SHAPE = dict(hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=2, vocab_size=256)  # fmt: skip
SHARD_EXPERTS = [list(range(0, 4)), list(range(4, 8))]


def slices_for(num_rows: int, seed: int = 0) -> list[tuple[int, torch.Tensor, list[int], list[int]]]:
    """(shard, rows [n, H], expert ids, counts): half the rows to each shard, spread over its 4 experts."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shard, experts in enumerate(SHARD_EXPERTS):
        n = num_rows // 2
        counts = [n // 4 + (i < n % 4) for i in range(4)]
        out.append((shard, torch.randn(n, HIDDEN, generator=gen), experts, counts))
    return out


def summarize(times_s: list[float], compute_s: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in times_s)
    return {
        "median_ms": round(statistics.median(ms), 3),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3),
        "shard_compute_median_ms": round(statistics.median(compute_s) * 1e3, 3),
        "iters": len(ms),
    }


def time_transport(transport, rows_list: list[int], iters: int, warmup: int = 5) -> dict:
    from raymoe.cluster.transport import ShardOutput

    results = {}
    for num_rows in rows_list:
        slices = slices_for(num_rows)
        times, compute = [], []
        for i in range(warmup + iters):
            start = time.perf_counter()
            sent = [transport.send(s, 0, rows, ids, counts) for s, rows, ids, counts in slices]
            replies = transport.wait(sent, 60.0)
            elapsed = time.perf_counter() - start
            assert all(isinstance(r, ShardOutput) for r in replies), replies
            if i >= warmup:
                times.append(elapsed)
                compute.append(max(r.compute_s for r in replies))
        results[num_rows] = summarize(times, compute)
    return results


class Caller:
    """Runs the round trips from inside an actor (a decode worker's position)."""

    def __init__(self, handles):
        torch.set_num_threads(1)
        self.handles = handles

    def actor_calls(self, rows_list, iters, inline):
        from raymoe.cluster.transport import ActorCallTransport

        return time_transport(ActorCallTransport(self.handles, inline=inline), rows_list, iters)

    def gloo(self, rows_list, iters):
        from raymoe.cluster.transport_nccl import CollectiveTransport

        transport = CollectiveTransport(self.handles, backend="gloo", timeout_s=60.0)
        try:
            return time_transport(transport, rows_list, iters)
        finally:
            transport.close()


def compiled_graph(handles, rows_list, iters, warmup=5, teardown_s=20.0) -> dict:
    import ray
    from ray.dag import InputNode, MultiOutputNode

    with InputNode() as inp:
        outs = [h.run.bind(0, inp[i], SHARD_EXPERTS[i], inp[2 + i]) for i, h in enumerate(handles)]
        dag = MultiOutputNode(outs)
    cdag = dag.experimental_compile()
    results = {}
    try:
        for num_rows in rows_list:
            (_, r0, _, c0), (_, r1, _, c1) = slices_for(num_rows)
            times, compute = [], []
            for i in range(warmup + iters):
                start = time.perf_counter()
                replies = ray.get(cdag.execute(r0, r1, c0, c1), timeout=60)
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    times.append(elapsed)
                    compute.append(max(c for _, c in replies))
            results[num_rows] = summarize(times, compute)
    finally:
        done = threading.Thread(target=cdag.teardown, daemon=True)
        done.start()
        done.join(teardown_s)
        results["teardown_hung"] = done.is_alive()
    return results


def run_method(name: str, fn) -> dict:
    try:
        return fn()
    except Exception as e:  # a method that does not work here is reported, not fatal
        return {"error": f"{type(e).__name__}: {e}"[:400]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--skip", nargs="*", default=[], help="methods to leave out")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from checkpoints import build_checkpoint

    from raymoe.actors.expert_shard import ExpertShard
    from raymoe.cluster.transport import ActorCallTransport

    torch.set_num_threads(1)
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        with tempfile.TemporaryDirectory() as tmp:
            path = str(build_checkpoint("mixtral", Path(tmp) / "ckpt", **CKPT_SHAPE))
            handles = [
                ExpertShard.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(path, [(0, e) for e in experts])
                for node, experts in zip(nodes, SHARD_EXPERTS)
            ]
            ray.get([h.ping.remote() for h in handles], timeout=120)
            caller = ray.remote(Caller).options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[0], soft=False)
            ).remote(handles)
            def from_actor(inline):
                return ray.get(caller.actor_calls.remote(args.rows, args.iters, inline), timeout=600)

            methods = {
                "actor_call_plain": lambda: time_transport(ActorCallTransport(handles, False), args.rows, args.iters),
                "actor_call": lambda: time_transport(ActorCallTransport(handles), args.rows, args.iters),
                "actor_call_plain_from_actor": lambda: from_actor(False),
                "actor_call_from_actor": lambda: from_actor(True),
                "gloo_p2p": lambda: ray.get(caller.gloo.remote(args.rows, args.iters), timeout=600),
                "compiled_graph": lambda: compiled_graph(handles, args.rows, args.iters),
            }
            results = {name: run_method(name, fn) for name, fn in methods.items() if name not in args.skip}
    finally:
        ray.shutdown()
        cluster.shutdown()
    report = {
        "bench": "transport",
        "baseline": "actor_call_plain",
        "shape": {"hidden": HIDDEN, "shards": 2, "dtype": "float32", "rows": args.rows},
        "machine": {"cpus": os.cpu_count(), "torch_threads": 1},
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
