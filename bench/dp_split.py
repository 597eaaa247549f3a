"""What each data-parallel replica's share of bench/engine.py's serving mix costs, run alone.

    python bench/dp_split.py [--replicas 2] [--num-requests 96] [--repeats 2]

One process, one torch thread, one engine after another (no two run at once, so the figures do not
depend on what else the machine runs): the whole mix on one engine with max_num_seqs 32, then each
replica's share (`raymoe.policies.data_parallel.assign_requests`) on an engine with 32 / replicas
running sequences (`raymoe.LLM(data_parallel_size=N)`'s split) and with 32 each. Per run: engine
steps, CPU seconds (best of --repeats) and ms per step. On idle cores the replicas run at once, so
data parallelism's wall time is about the slowest share's, its CPU the sum of the shares'.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from engine import serving_requests
from raymoe.engine.llm import LLM
from raymoe.engine.sampling_params import SamplingParams
from raymoe.model.spec import load_spec
from raymoe.model.builtin import builtin_model_path
from raymoe.policies.data_parallel import assign_requests


def run(requests: list, max_num_seqs: int, repeats: int) -> dict:
    llm = LLM(max_num_seqs=max_num_seqs, threads=1)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in requests]
    prompts = [p for p, _ in requests]
    llm.generate(prompts[:4], params[:4])  # warm-up
    steps, step = [0], llm.engine.step

    def counted_step():
        steps[0] += 1
        return step()

    llm.engine.step = counted_step
    best = float("inf")
    for _ in range(repeats):
        steps[0], start = 0, time.process_time()
        llm.generate(prompts, params)
        best = min(best, time.process_time() - start)
    return {"max_num_seqs": max_num_seqs, "requests": len(requests), "steps": steps[0], "cpu_seconds": best,
            "ms_per_step": 1000 * best / steps[0]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    requests = serving_requests(load_spec(builtin_model_path()).vocab_size, args.num_requests)
    plan = assign_requests([len(p) + n for p, n in requests], args.replicas)
    report = {"one_engine": run(requests, 32, args.repeats)}
    for name, seqs in (("split", -(-32 // args.replicas)), ("each32", 32)):
        shares = [run([requests[i] for i in indices], seqs, args.repeats) for indices in plan]
        report[name] = {"shares": shares, "slowest_cpu_seconds": max(s["cpu_seconds"] for s in shares),
                        "sum_cpu_seconds": sum(s["cpu_seconds"] for s in shares)}  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
