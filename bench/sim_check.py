"""The simulator's step-time model against the real cluster's measured decode step, on this machine.

    python bench/sim_check.py [--repeats 3] [--batch 16] [--new-tokens 48] [--out bench/out/sim_check.json]

One run, one process, a local Ray cluster (loopback only). Prints one JSON object:
- `calibrated`: the simulator's NodeSpec, measured here and now, one thread as every actor runs:
  FLOP/s twice (a 512^3 float32 matmul, and the model's own expert GEMM at the run's mean rows
  per expert), memory bandwidth (summing a 256 MiB tensor), and the network's per-dispatch
  latency and bandwidth (an actor sending 1 KiB and 64 KiB payloads to 2 echo actors at once
  and waiting for both, as the decode worker calls its 2 shards: `bench/transport.py`'s path);
- `measured_ms`: `bench/cluster.py`'s decode step on the built-in model (1 decode worker, 2 expert
  shards, microbatch 1, `--batch` greedy requests), ms per step by component, medians of repeats;
- `modelled_ms_decode_gemm` / `_large_gemm`: `raymoe.sim.step_breakdown` on the `raymoe-builtin`
  preset over the same layout (every pair crosses the wire: `raymoe.sim.disaggregated`), with the
  routing the real run reported to the controller (its per-expert distribution, scaled to
  `--batch` tokens a step), under each FLOP/s calibration;
- `error_*`: `raymoe.sim.step_time_error(modelled, measured)` per component and `max_abs`;
- `expert_in_process_ms_per_shard`: each shard's expert work of one step run in this process
  with nothing else busy (an attribution of the expert error, not a calibration).
Components: `step`, `local` (attention, router, LM head, combine: the worker's own work),
`network` (both directions of the round trip, less the shards' compute) and `expert`.
Nothing modelled is fitted to what is measured: only the NodeSpec figures are calibrated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only, before Ray starts
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import ray
import torch
from cluster import ENGINE, median_dicts, on_cluster, workload

from raymoe.actors.cluster import MoECluster
from raymoe.cluster.cluster import ClusterConfig
from raymoe.engine.sampling_params import SamplingParams
from raymoe.model.builtin import random_model_path
from raymoe.model.spec import load_spec
from raymoe.sim import NodeSpec, step_breakdown, step_time_error
from raymoe.sim.disaggregated import (
    disaggregated_replay,
    measured_components,
    modelled_components,
    per_step_pairs,
)
from raymoe.sim.models import BUILTIN, from_model_spec

SMALL, LARGE = 1 << 10, 64 << 10  # payload bytes; both under Ray's inline limit, as dispatch is


def best_of(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def calibrate_compute(rows_per_expert: int, hidden: int, width: int) -> dict:
    """Sustained single-thread FLOP/s, at a large GEMM and at the model's own expert GEMM shape
    (`rows_per_expert` rows through its gate+up projection), and memory read bandwidth (bytes/s)."""
    torch.set_num_threads(1)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    x, w = torch.randn(rows_per_expert, hidden), torch.randn(hidden, 2 * width)
    big = torch.randn(64 << 20)  # 256 MiB: far past the caches
    return {
        "flops_large_gemm": 2 * 512**3 / best_of(lambda: a @ b),
        "flops_decode_gemm": 2 * x.numel() * w.shape[1] / best_of(lambda: [x @ w for _ in range(100)]) * 100,
        "memory_bandwidth": big.numel() * 4 / best_of(lambda: big.sum(), repeats=3),
    }


def expert_in_process_ms(model_path: str, pairs: np.ndarray, experts: list[set[int]]) -> float:
    """One shard's expert compute per decode step (`experts[i]`: what it holds at MoE layer i),
    run in this process with no other process busy: not a calibration, an attribution of the
    measured `expert` time to the kernels themselves vs sharing 2 cores with the cluster."""
    from raymoe.actors.expert_shard import ExpertShardCore

    layer_ids = load_spec(model_path).moe_layer_ids
    core = ExpertShardCore(model_path, [(layer_ids[i], e) for i, held in enumerate(experts) for e in held])
    jobs = []
    for i, held in enumerate(experts):
        ids = sorted(held)
        counts = [max(1, round(pairs[i, e])) for e in ids]
        jobs.append((layer_ids[i], torch.randn(sum(counts), core.spec.hidden_size), ids, counts))
    return 1e3 * best_of(lambda: [core.run(*job) for job in jobs])


class Echo:
    def echo(self, payload: bytes) -> bytes:
        return payload


class Caller:
    def round_trip_s(self, echoes, size: int, iters: int) -> float:
        """Median time to send `size` bytes to every echo actor at once and get them back."""
        payload = bytes(size)
        times = []
        for _ in range(iters + 5):
            start = time.perf_counter()
            ray.get([e.echo.remote(payload) for e in echoes])
            times.append(time.perf_counter() - start)
        return float(np.median(times[5:]))


def calibrate_network(fan_out: int, iters: int = 200) -> dict:
    """Per-dispatch latency (half a small round trip to `fan_out` actors at once, as a dispatch
    reaches every shard) and bandwidth (from the slope between two payload sizes)."""
    echoes = [ray.remote(Echo).options(num_cpus=0).remote() for _ in range(fan_out)]
    caller = ray.remote(Caller).options(num_cpus=0).remote()
    small, large = (ray.get(caller.round_trip_s.remote(echoes, n, iters)) for n in (SMALL, LARGE))
    for actor in (*echoes, caller):
        ray.kill(actor)
    bandwidth = 2 * fan_out * (LARGE - SMALL) / max(large - small, 1e-9)
    return {"network_latency_s": small / 2, "network_bandwidth": bandwidth,
            "round_trip_ms": {"1KiB": 1e3 * small, "64KiB": 1e3 * large}}  # fmt: skip


def measure_cluster(model_path: str, args) -> tuple[dict, np.ndarray, list]:
    """(median decode breakdown, the routed load the controller saw, shards' experts per layer)."""
    prompts, params = workload(args.batch, args.new_tokens)
    cluster = MoECluster(model_path, ClusterConfig(engine=ENGINE, num_shards=2, namespace="bench-sim-check"))
    try:
        cluster.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        measured = median_dicts([on_cluster(cluster, prompts, params) for _ in range(args.repeats)])
        time.sleep(1.5)  # the decode worker reports its load every second
        load = np.array(ray.get(cluster.controller.load.remote()))
        placement, _ = ray.get(cluster.controller.placement.remote())
    finally:
        cluster.shutdown()
    layers = load_spec(model_path).moe_layer_ids
    shard_experts = [[{e for lay, e in placement.experts_on(s) if lay == layer} for s in range(placement.num_shards)]
                     for layer in layers]  # fmt: skip
    return measured, load[layers], shard_experts


def modelled_vs_measured(replay, topology, compute: dict, network: dict, context: int, real: dict) -> dict:
    """The modelled components and their errors, once per FLOP/s calibration."""
    out = {}
    for label in ("decode_gemm", "large_gemm"):
        node = NodeSpec(flops=compute[f"flops_{label}"], memory_bandwidth=compute["memory_bandwidth"],
                        network_bandwidth=network["network_bandwidth"], network_latency_s=network["network_latency_s"])  # fmt: skip
        modelled = modelled_components(step_breakdown(replay, BUILTIN, node, topology, context_tokens=context))
        out[f"modelled_ms_{label}"] = in_ms(modelled)
        out[f"error_{label}"] = step_time_error(modelled, real)
    return out


def in_ms(seconds: dict) -> dict:
    """{"step_s": 0.05, ...} -> {"step": 50.0, ...}"""
    return {k.removesuffix("_s"): 1e3 * v for k, v in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model_path = str(random_model_path())  # the BUILTIN preset describes the random test model
    assert from_model_spec(load_spec(model_path), BUILTIN.name, 4) == BUILTIN, "preset out of date"
    rows_per_expert = args.batch * BUILTIN.top_k // BUILTIN.num_experts
    compute = calibrate_compute(rows_per_expert, BUILTIN.hidden_size, BUILTIN.expert_intermediate)
    ray.init(num_cpus=8, include_dashboard=False)
    network = calibrate_network(fan_out=2)
    measured, load, shard_experts = measure_cluster(model_path, args)
    ray.shutdown()
    pairs = per_step_pairs(load, args.batch, BUILTIN.top_k)
    replay, topology = disaggregated_replay(pairs, shard_experts, args.batch)
    context = 32 + args.new_tokens // 2  # prompt + half the outputs: the mean decode step's context
    real = measured_components(measured["ms_per_step"], measured["breakdown_ms_per_step"])
    report = {
        "config": vars(args) | {"model": BUILTIN.name, "shards": 2, "microbatches": 1, "context_tokens": context},
        "calibrated": {**compute, **network},
        "measured_ms": in_ms(real),
    }
    report |= modelled_vs_measured(replay, topology, compute, network, context, real)
    report["expert_in_process_ms_per_shard"] = [  # compare with measured_ms.expert
        expert_in_process_ms(model_path, pairs, [layer[s] for layer in shard_experts]) for s in (0, 1)
    ]
    report["measured_raw"] = measured
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
