"""A prompt's KV from a prefill worker to a decode worker: through the KV pool, or straight over Ray
Direct Transport (`ClusterConfig.kv_transport`)?

    python bench/kv_handoff.py [--iters 30] [--blocks 4 16 64] [--out bench/out/kv_handoff.json]

One local Ray cluster of 2 nodes on loopback: a producer actor on one node holds a prompt's exported
blocks (the built-in model's layout, block size 16, float32) as the prefill worker does; a consumer
actor on the other node ends with them as one [n, block_numel] tensor, ready for `import_blocks`,
as the decode worker does. Methods, all in the same run, timed from the driver (the front):
- pool (baseline, `kv_transport: pool`): the producer publishes to its node's KV pool (`contains`
  then `put_blocks`, as `PrefillCore._publish`), the consumer reads them by key from that node's
  pool after missing in its own (`PoolSet.get_blocks`, as `DecodeCore.submit`) and stacks them;
- direct: `take.options(tensor_transport="gloo")`, its ref a top-level argument of the consumer's
  call, over a gloo group of the two actors: the transfer alone;
- direct_publish_in_background (`kv_transport: gloo` as built): the producer starts the pool publish
  on a background thread (`kv_direct.Publisher`; the pool stays the fallback for resumes), then
  the direct transfer; timed until the consumer has the tensor, the publish waited for before the
  next hand-off;
- publish_then_direct: the publish first, then direct (were the publish kept on the path);
- object_store: the same ref without tensor_transport (Ray's object store), for reference.
With --cluster R, also end to end on real workers: two `MoECluster`s side by side (prefill worker
on one node, decode worker on the other, `kv_transport` pool and gloo), R alternating rounds of
`generate` over --batch fresh prompts of --prompt-len tokens and 2 output tokens (prefill, hand-off,
one decode step), median seconds per round and the decode worker's block sources.
Prints one JSON object: per method and block count the median and p90 milliseconds per hand-off.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

NAMESPACE = "bench-kv-handoff"
_keys = itertools.count()


class Producer:
    """The prefill worker's side: blocks to publish or to hand over."""

    def __init__(self, block_numel: int):
        from raymoe.actors.remote_backend import PoolSet

        torch.set_num_threads(1)
        self.numel, self.pools = block_numel, PoolSet(NAMESPACE, 1 << 30, torch.float32)

    def blocks(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.numel)  # [n, block_numel]

    def publish(self, keys: list[str]) -> str:
        """As PrefillCore._publish: the blocks this node's pool lacks; returns this node's id."""
        pool = self.pools.client(self.pools.node_id)
        have = pool.contains(keys)
        pool.put_blocks([k for k, h in zip(keys, have) if not h], list(self.blocks(len(keys)).unbind(0)))
        return self.pools.node_id

    def take(self, n: int) -> dict:
        return {"keys": [str(i) for i in range(n)], "blocks": self.blocks(n)}

    def take_publishing(self, keys: list[str]) -> dict:
        """take, with the publish of the same blocks started on a background thread."""
        import threading

        self.publishing = threading.Thread(target=self.publish, args=(keys,))
        self.publishing.start()
        return self.take(len(keys))

    def published(self) -> bool:
        self.publishing.join()
        return True


class Consumer:
    """The decode worker's side: the blocks as one tensor."""

    def __init__(self):
        from raymoe.actors.remote_backend import PoolSet

        torch.set_num_threads(1)
        self.pools = PoolSet(NAMESPACE, 1 << 30, torch.float32)

    def fetch(self, keys: list[str], source_node: str) -> list[int]:
        blocks = self.pools.get_blocks(keys, source_node)
        return list(torch.stack(blocks).shape)

    def admit(self, taken: dict) -> list[int]:
        return list(taken["blocks"].shape)


def timed(fn, iters: int, warmup: int = 3) -> dict:
    import ray

    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        after = fn()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
        if after is not None:  # work the method leaves running (a background publish): not timed
            ray.get(after())
    times.sort()
    return {"median_ms": round(statistics.median(times), 3), "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3)}


def methods(producer, consumer, n: int) -> dict:
    import ray

    def pool():
        keys = [f"b{next(_keys)}" for _ in range(n)]  # new keys: a real publish every time
        node = ray.get(producer.publish.remote(keys))
        assert ray.get(consumer.fetch.remote(keys, node))[0] == n

    def direct():
        assert ray.get(consumer.admit.remote(producer.take.options(tensor_transport="gloo").remote(n)))[0] == n

    def direct_publish_in_background():
        ref = producer.take_publishing.options(tensor_transport="gloo").remote([f"b{next(_keys)}" for _ in range(n)])
        assert ray.get(consumer.admit.remote(ref))[0] == n
        return producer.published.remote  # waited for outside the timing

    def publish_then_direct():
        ray.get(producer.publish.remote([f"b{next(_keys)}" for _ in range(n)]))
        direct()

    def object_store():
        assert ray.get(consumer.admit.remote(producer.take.remote(n)))[0] == n

    return {"pool": pool, "direct": direct, "direct_publish_in_background": direct_publish_in_background,
            "publish_then_direct": publish_then_direct, "object_store": object_store}  # fmt: skip


def cluster_rounds(rounds: int, batch: int, prompt_len: int) -> dict:
    """generate() seconds per round on a split cluster, pool against gloo, rounds alternating."""
    from raymoe.actors.cluster import MoECluster
    from raymoe.cluster.cluster import ClusterConfig
    from raymoe.engine.llm_engine import EngineConfig
    from raymoe.engine.sampling_params import SamplingParams

    engine = EngineConfig(max_num_seqs=16, max_num_batched_tokens=512, dtype="float32", device="cpu")
    clusters = {kind: MoECluster(None, ClusterConfig(engine=engine, kv_transport=kind, namespace=f"kvh-{kind}",
                                                     prefill_resources={"kv_prefill": 0.01},
                                                     decode_resources={"kv_decode": 0.01}))
                for kind in ("pool", "gloo")}  # fmt: skip
    params, seconds = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), {k: [] for k in clusters}
    try:
        for r in range(rounds + 1):  # round 0 warms up
            for kind, cluster in clusters.items():
                prompts = [[(31 * r + 7 * i + 13 * j * j + len(kind)) % 1000 + 10 for j in range(prompt_len)]
                           for i in range(batch)]  # fmt: skip (fresh every round: no prefix hits)
                start = time.perf_counter()
                cluster.generate(prompts, params)
                if r:
                    seconds[kind].append(time.perf_counter() - start)
        stats = {k: c.stats()["decode"][0] for k, c in clusters.items()}
    finally:
        for c in clusters.values():
            c.shutdown()
    return {k: {"median_s": round(statistics.median(v), 3), "rounds": len(v),
                "kv_direct_blocks": stats[k]["kv_direct_blocks"], "kv_pool_blocks": stats[k]["kv_pool_blocks"]}
            for k, v in seconds.items()}  # fmt: skip


def block_numel() -> int:
    from raymoe.model.builtin import builtin_model_path
    from raymoe.model.model import load_model

    layout = load_model(builtin_model_path()).kv_layout()
    return sum(16 * heads * (k + v) for heads, k, v in layout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--cluster", type=int, default=0, help="rounds end to end on real workers (0: none)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only, before Ray starts
    import ray
    from ray.cluster_utils import Cluster
    from ray.experimental.collective import create_collective_group
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    numel = block_numel()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"kv_prefill": 1}})
    cluster.add_node(num_cpus=2, resources={"kv_decode": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())

        def on(node):
            return dict(num_cpus=0, max_concurrency=8, enable_tensor_transport=True,
                        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))  # fmt: skip

        producer = ray.remote(**on(nodes[0]))(Producer).remote(numel)
        consumer = ray.remote(**on(nodes[1]))(Consumer).remote()
        create_collective_group([producer, consumer], backend="torch_gloo", name=f"raymoe-kv-{NAMESPACE}")
        results = {}
        for n in args.blocks:
            for name, fn in methods(producer, consumer, n).items():
                results.setdefault(name, {})[n] = timed(fn, args.iters)
        if args.cluster:
            results["cluster_generate"] = cluster_rounds(args.cluster, args.batch, args.prompt_len)
    finally:
        ray.shutdown()
        cluster.shutdown()
    report = {"bench": "kv_handoff", "baseline": "pool",
              "shape": {"block_size": 16, "block_numel": numel, "dtype": "float32", "blocks": args.blocks,
                        "cluster": {"rounds": args.cluster, "batch": args.batch, "prompt_len": args.prompt_len},
                        "mib_per_block": round(numel * 4 / 2**20, 4)},
              "machine": {"cpus": os.cpu_count(), "torch_threads": 1}, "results": results}  # fmt: skip
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
