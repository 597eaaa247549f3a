"""Decode on the cluster against the one-process engine, and microbatch 1 against 2, on the built-in model.

    python bench/cluster.py [--repeats 3] [--batch 16] [--new-tokens 48] [--worker-niceness N]
        [--out bench/out/cluster.json]

Prints one JSON object. Runs in one process on a 1-node local Ray cluster (loopback only), whose
worker processes run at this process's niceness unless --worker-niceness says otherwise (Ray's own
default is 15: on a machine busy with other work that alone slows the actors against a baseline
at 0). The cluster serves through `MoECluster.generate` (whole outputs: lingering polls).
- baseline `one_process`: raymoe's engine with every expert in-process;
- `cluster_colocated`: one prefill and one decode worker, 2 expert shards, all on the one node, so
  the decode worker co-hosts every expert (runs them in its own process); its repeats alternate
  with the baseline's, so both see the same machine;
- `cluster_2_shards_mb1` and `cluster_2_shards_mb2`: the same with co-location off (every row
  crosses to a shard), microbatches 1 and 2.
Workload: `--batch` greedy requests of 32 prompt tokens and `--new-tokens` outputs (ignore_eos).
Figures are from pure decode steps only (every running sequence decoding): decode tokens/s and
ms per step, split into attention (+ router, sampling, everything local), dispatch (the worker
waiting on the transport beyond the shards' compute), expert compute on shards, expert compute in
the worker (`local_expert`) and combine; and where the decode worker's rows went (`dispatch`:
rows crossing a process / a node per token, local activation rate). Medians over repeats. `hidden_dispatch_share` = 1 - exposed round trip (mb2) / exposed round trip (mb1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only, before Ray starts

import ray
import torch

from raymoe.actors.cluster import MoECluster
from raymoe.cluster.cluster import ClusterConfig
from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.engine.sampling_params import SamplingParams
from raymoe.model.builtin import builtin_model_path
from raymoe.model.model import load_model
from raymoe.model.spec import load_spec

ENGINE = EngineConfig(max_num_seqs=32, max_num_batched_tokens=512)


def workload(batch: int, new_tokens: int):
    prompts = [[(17 * i + 5 * j) % 1000 + 10 for j in range(32)] for i in range(batch)]
    return prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)


def one_process(model_path, prompts, params) -> dict:
    torch.set_num_threads(1)  # as each worker actor does
    engine = LLMEngine(load_model(model_path), None, ENGINE)
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=str(i))
    steps, seconds, tokens = 0, 0.0, 0
    while engine.has_unfinished():
        sched = engine.scheduler
        is_decode = not sched.waiting and all(s.num_uncomputed_tokens == 1 for s in sched.running)
        start = time.perf_counter()
        out = engine.step()
        if is_decode:
            steps, seconds, tokens = steps + 1, seconds + time.perf_counter() - start, tokens + len(out)
    return {"decode_tokens_per_s": tokens / seconds, "ms_per_step": 1000 * seconds / steps}


def on_cluster(cluster: MoECluster, prompts, params) -> dict:
    worker = cluster.decode[0]
    ray.get(worker.take_timings.remote())
    cluster.generate(prompts, params)
    t = ray.get(worker.take_timings.remote())
    steps, total = t["decode_steps"], t["decode_step_s"]
    remote = {k: t[k] for k in ("dispatch_s", "expert_s", "local_expert_s", "combine_s")}
    # expert timings of a few non-decode steps (handoff tails) are included: scale to decode steps
    return {
        "decode_tokens_per_s": t["decode_tokens"] / total,
        "ms_per_step": 1000 * total / steps,
        "breakdown_ms_per_step": {
            "attention_and_local": 1000 * (total - sum(remote.values())) / steps,
            **{k.replace("_s", ""): 1000 * v / steps for k, v in remote.items()},
        },
        "exposed_round_trip_ms_per_step": 1000 * (remote["dispatch_s"] + remote["expert_s"]) / steps,
        "dispatch": {k: v for k, v in ray.get(worker.stats.remote())["dispatch"].items() if k.startswith(("rows_c", "local"))},
    }


def memory(cluster: MoECluster) -> dict:
    """Per process of the cluster (workers and shards), MB from /proc/<pid>/smaps_rollup: Rss,
    Pss (shared pages split between their users) and Private (pages no other process maps)."""
    _, shards = ray.get(cluster.controller.placement.remote())
    actors = {"prefill": cluster.prefill[0], "decode": cluster.decode[0], **{f"shard_{i}": h for i, h in enumerate(shards)}}
    out = {}
    for name, actor in actors.items():
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
        fields = dict(line.split(":") for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
        kb = {k: int(v.split()[0]) for k, v in fields.items()}
        out[name] = {"rss_mb": kb["Rss"] / 1024, "pss_mb": kb["Pss"] / 1024,
                     "private_mb": (kb["Private_Clean"] + kb["Private_Dirty"]) / 1024}  # fmt: skip
    return out


def start(model_path, prompts, **options) -> MoECluster:
    cluster = MoECluster(model_path, ClusterConfig(engine=ENGINE, **options))
    cluster.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    return cluster


def median_ratio(runs: list[dict], baseline: list[dict]) -> float:
    """Median over repeats of tokens/s ratios of runs made side by side."""
    return statistics.median(r["decode_tokens_per_s"] / b["decode_tokens_per_s"] for r, b in zip(runs, baseline))


def median_dicts(runs: list[dict]) -> dict:
    out = {}
    for key, value in runs[0].items():
        vals = [r[key] for r in runs]
        out[key] = median_dicts(vals) if isinstance(value, dict) else statistics.median(vals)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker-niceness", type=int, default=os.nice(0),
                        help="niceness of Ray's worker processes (Ray's own default is 15); default: this "
                             "process's, so the cluster's actors and the one-process baseline compete for "
                             "the cores on equal terms")  # fmt: skip
    args = parser.parse_args()
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # read by the raylet Ray starts below
    model_path = builtin_model_path()
    prompts, params = workload(args.batch, args.new_tokens)
    ray.init(num_cpus=8, include_dashboard=False)
    report = {"config": vars(args) | {"model": "builtin", "engine": ENGINE.__dict__}}
    cluster = start(model_path, prompts, num_shards=2, namespace="bench-colocated")
    base, colocated = [], []
    for _ in range(args.repeats):  # alternating: both see the same machine
        base.append(one_process(model_path, prompts, params))
        colocated.append(on_cluster(cluster, prompts, params))
    report["memory_colocated_mb"] = memory(cluster)
    spec = load_spec(model_path)  # float32 routed expert weights of the whole model:
    report["expert_weights_mb"] = 4 * 3 * spec.hidden_size * spec.moe_intermediate_size * spec.num_experts \
        * len(spec.moe_layer_ids) / 2**20
    cluster.shutdown()
    report["one_process"], report["cluster_colocated"] = median_dicts(base), median_dicts(colocated)
    for m in (1, 2):
        cluster = start(model_path, prompts, num_shards=2, num_microbatches=m, colocate_experts=False,
                        namespace=f"bench-mb{m}")  # fmt: skip
        report[f"cluster_2_shards_mb{m}"] = median_dicts([on_cluster(cluster, prompts, params)
                                                         for _ in range(args.repeats)])  # fmt: skip
        cluster.shutdown()
    mb1, mb2 = report["cluster_2_shards_mb1"], report["cluster_2_shards_mb2"]
    report["ratios"] = {
        "colocated_vs_one_process_tokens_per_s": median_ratio(colocated, base),
        "colocated_vs_one_process_per_repeat": [c["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                                                for c, b in zip(colocated, base)],  # fmt: skip
        "cluster_mb1_vs_one_process_tokens_per_s": mb1["decode_tokens_per_s"] / report["one_process"]["decode_tokens_per_s"],
        "mb2_vs_mb1_tokens_per_s": mb2["decode_tokens_per_s"] / mb1["decode_tokens_per_s"],
        "hidden_dispatch_share": 1 - mb2["exposed_round_trip_ms_per_step"] / mb1["exposed_round_trip_ms_per_step"],
    }  # fmt: skip
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    ray.shutdown()


if __name__ == "__main__":
    main()
