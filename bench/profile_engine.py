"""Where the engine's step time goes on bench/engine.py's serving mix (issue 15).

    python bench/profile_engine.py [--num-requests 96] [--dtype float32] [--profile 40]

`LLMEngine` in this process, 1 torch thread, the serving requests of `bench/engine.py` (prompts 4-200,
outputs 8-256, at most 32 running, 512 tokens per step). Prints JSON: wall time, useful tok/s, ms per
step by kind (pure decode, mixed prefill + decode), CPU seconds of the process (steadier than wall time
on a shared machine) and, with --profile N, torch.profiler's top ops by
self CPU time over N mixed and pure steps, plus the share of time inside attention (`attention`
region), MoE FFN (`ffn`) and the LM head (`head`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def regions(model):
    """Label attention, FFN and head calls with torch.profiler record_function."""
    import torch

    patched = []

    def wrap(obj, name, label):
        fn = getattr(obj, name)

        def labelled(*a, **k):
            with torch.profiler.record_function(label):
                return fn(*a, **k)

        setattr(obj, name, labelled)
        patched.append((obj, name, fn))

    for layer in model.layers:
        wrap(layer, "attention_part", "attention")
        wrap(layer, "ffn_part", "ffn")
    wrap(model, "compute_logits", "head")
    try:
        yield
    finally:
        for obj, name, fn in patched:
            setattr(obj, name, fn)


def run(num_requests: int, dtype: str, profile_steps: int, top: int = 25) -> dict:
    import torch

    import engine as bench_engine
    from raymoe.engine.llm_engine import EngineConfig, LLMEngine
    from raymoe.engine.sampling_params import SamplingParams
    from raymoe.model.builtin import builtin_model_path

    torch.set_num_threads(1)
    config = EngineConfig(max_num_seqs=32, max_num_batched_tokens=512, dtype=dtype, threads=1)
    engine = LLMEngine.from_path(builtin_model_path(), config)
    requests = bench_engine.serving_requests(engine.model.spec.vocab_size, num_requests)

    def add(reqs, tag):
        for i, (p, n) in enumerate(reqs):
            engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), f"{tag}{i}")

    add(requests[:4], "warm")
    while engine.has_unfinished():
        engine.step()
    add(requests, "r")
    kinds: dict[str, list[float]] = {"decode": [], "mixed": []}
    runner, inner = engine.model_runner, engine.model_runner.run

    def timed_run(scheduled):  # model time per step, by kind: pure decode or with prompt tokens
        t0 = time.perf_counter()
        out = inner(scheduled)
        kinds["decode" if all(n == 1 for _, n in scheduled) else "mixed"].append(time.perf_counter() - t0)
        return out

    runner.run = timed_run
    prof, profiled, steps = None, 0, 0
    start, cpu_start = time.perf_counter(), time.process_time()
    while engine.has_unfinished():
        if prof is None and profiled == 0 and profile_steps and len(engine.scheduler.running) >= 16:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            labels = regions(engine.model)
            prof.__enter__(), labels.__enter__()
        engine.step()
        steps += 1
        if prof is not None:
            profiled += 1
            if profiled == profile_steps or not engine.has_unfinished():
                labels.__exit__(None, None, None), prof.__exit__(None, None, None)
                paused = time.perf_counter()
                table, prof = profile_summary(prof, top), None
                start += time.perf_counter() - paused  # the summary is not the engine's time
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    useful = sum(n for _, n in requests)
    out = {"seconds": round(wall, 2), "useful_tokens_per_s": round(useful / wall, 1), "steps": steps,
           "cpu_seconds": round(cpu, 2), "useful_tokens_per_cpu_s": round(useful / cpu, 1),
           "model_seconds": round(sum(map(sum, kinds.values())), 2)}
    for k, ts in kinds.items():
        out[f"{k}_steps"] = len(ts)
        out[f"{k}_ms_p50"] = round(1000 * statistics.median(ts), 2) if ts else None
        out[f"{k}_seconds"] = round(sum(ts), 2)
    if profiled:
        out["profile"] = table
    return out


def profile_summary(prof, top: int) -> dict:
    """Top ops by self CPU time and the labelled regions' total CPU time, in ms and % of the total."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1000
    region = {e.key: round(e.cpu_time_total / 1000, 1) for e in events if e.key in ("attention", "ffn", "head")}
    ops = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {"total_ms": round(total, 1), "regions_ms": region,
            "regions_pct": {k: round(100 * v / total, 1) for k, v in region.items()},
            "top_self_ms": {e.key: [round(e.self_cpu_time_total / 1000, 1), e.count] for e in ops}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=96)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--profile", type=int, default=0, help="profile this many steps (0: none)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    print(json.dumps(run(args.num_requests, args.dtype, args.profile, args.top)))


if __name__ == "__main__":
    main()
