"""Speculative decoding: decode tokens/s and mean accepted length of each drafter against plain
decoding, on a trained built-in model's prose and document-QA prompts, at batch 1, 4, 16 and 64, in
one process and on a local 2-shard cluster.

    python bench/speculative.py [--model PATH] [--repeats 3] [--cluster] [--out bench/out/speculative.json]

Prints one JSON object (and writes it to --out). Workloads (held-out text, `raymoe.model.docqa`):
- prose: the first third of a held-out corpus paragraph (then grammar prose from an unused seed),
  64 greedy tokens (ignore_eos: every method decodes the same number of tokens);
- docqa: document-QA prompts with held-out names and values, greedy up to 32 tokens (the answer, a
  newline, the end of text).
For each (workload, batch, method): a warm-up round, then `--repeats` rounds of fresh prompts
(Token Recycling keeps its matrix from round to round, as a server would); a round at batch B runs
max(1, 16 / B) batches of B prompts one after the other (on the cluster max(1, 4 / B)). Decode tokens/s =
tokens of the steps in which every sequence only decodes / those steps' time (prefill steps left
out); in one process the time is the stepping thread's CPU time (torch at 1 thread runs there; the
machine is shared, and other jobs' load would swamp wall-clock ratios: those are in the JSON too,
`wall_*`), on the cluster the decode worker's wall-clock step time (it waits on the shards). Rounds of the methods interleave; `speedup` is the median of per-round ratios to plain
decoding; greedy outputs must equal plain decoding's. `mean_accepted_tokens` = tokens per
sequence per verification step (1 = nothing gained).
`step_cost`: ms of one forward + logits for B sequences of q new tokens each (context 128): how
much a step costs as drafts are added, i.e. where decoding stops being memory-bound on this machine.
The cluster (`--cluster`): one prefill and one decode worker, 2 expert shards, co-location off (every
expert row crosses to a shard: one round trip per MoE layer per step), 1 torch thread per actor,
Ray's workers at this process's niceness (`--worker-niceness`; Ray's own default, 15, has them wait
behind every other job on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only, before Ray starts

import torch

from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.engine.sampling_params import SamplingParams
from raymoe.model.docqa import HELDOUT, CorpusGenerator, prose_split
from raymoe.model.paged import AttentionBatch, allocate_kv_cache

METHODS = ("none", "prompt_lookup", "token_recycling")
PARAMS = {"prose": SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
          "docqa": SamplingParams(temperature=0, max_tokens=32)}  # fmt: skip


def prompts(workload: str, n: int, round_: int) -> list[str]:
    """n prompts for round `round_` (0 = warm-up); rounds never share a prompt."""
    if workload == "docqa":
        gen = CorpusGenerator(1000 + round_, HELDOUT)
        return [gen.qa().prompt for _ in range(n)]
    held = prose_split()[1]
    gen = CorpusGenerator(2000 + round_)
    texts = [held[(round_ * n + i) % len(held)] if round_ * n + i < len(held) else gen.prose_paragraph()
             for i in range(n)]  # fmt: skip
    return [" ".join(t.split()[: max(6, len(t.split()) // 3)]) for t in texts]


def engine_config(method: str, batch: int, num_tokens: int | None, draft_cost: float = 0.1) -> EngineConfig:
    return EngineConfig(max_num_seqs=batch, max_num_batched_tokens=4096, kv_cache_bytes=64 << 20, threads=1,
                        speculative=method, num_speculative_tokens=num_tokens, speculative_draft_cost=draft_cost)  # fmt: skip


def engine_round(engine: LLMEngine, texts: list[str], params: SamplingParams) -> dict:
    """Run the waves of texts to the end, one after the other (a wave fills the batch);
    decode-only steps' tokens and seconds, outputs, drafts' counters."""
    before, batch = engine.spec_stats(), engine.config.max_num_seqs
    rounds = [engine_wave(engine, texts[i : i + batch], params) for i in range(0, len(texts), batch)]
    return {"tokens": sum(r[0] for r in rounds), "seconds": sum(r[1] for r in rounds),
            "wall_seconds": sum(r[2] for r in rounds), "outputs": [o for r in rounds for o in r[3]],
            **drafts(before, engine.spec_stats())}  # fmt: skip


def engine_wave(engine: LLMEngine, texts: list[str], params: SamplingParams) -> tuple[int, float, float, list]:
    """-> (decode tokens, their steps' CPU seconds (this thread: torch runs here at 1 thread, and
    other jobs on the machine do not count), wall seconds, outputs)."""
    ids = [engine.add_request(t, params) for t in texts]
    out: dict[str, list[int]] = {r: [] for r in ids}
    cpu, wall, tokens = 0.0, 0.0, 0
    while engine.has_unfinished():
        sched = engine.scheduler
        is_decode = not sched.waiting and all(s.num_uncomputed_tokens == 1 for s in sched.running)
        start, start_cpu = time.perf_counter(), time.thread_time()
        deltas = engine.step()
        elapsed, elapsed_cpu = time.perf_counter() - start, time.thread_time() - start_cpu
        for d in deltas:
            out[d.request_id].extend(d.token_ids)
        if is_decode:
            cpu, wall, tokens = cpu + elapsed_cpu, wall + elapsed, tokens + sum(len(d.token_ids) for d in deltas)
    return tokens, cpu, wall, [out[r] for r in ids]


def drafts(before: dict, after: dict) -> dict:
    """This round's acceptance rate and mean accepted length from cumulative counters."""
    d = {k: after[k] - before[k] for k in ("num_verify_steps", "num_draft_tokens", "num_accepted_tokens",
                                             "num_emitted_tokens")}  # fmt: skip
    return {"acceptance_rate": d["num_accepted_tokens"] / max(1, d["num_draft_tokens"]),
            "mean_accepted_tokens": d["num_emitted_tokens"] / max(1, d["num_verify_steps"])}  # fmt: skip


def compare(run_round, workload: str, batch: int, repeats: int, num_waves: int) -> dict:
    """run_round(method, texts, params) -> engine_round-like dict; rounds of the methods interleave."""
    params, rows = PARAMS[workload], {m: [] for m in METHODS}
    for r in range(repeats + 1):
        texts = prompts(workload, batch * num_waves, r)
        results = {m: run_round(m, texts, params) for m in METHODS}
        for m in METHODS:
            assert results[m]["outputs"] == results["none"]["outputs"], f"{m} changed greedy tokens"
            if r > 0:  # round 0 warms up
                rows[m].append(results[m])
    return {m: summary(rows[m], rows["none"]) for m in METHODS}


def waves(batch: int, tokens: int = 16) -> int:
    """Batches run one after the other in a round, so that a round at a small batch is long enough
    to time on a shared machine: `tokens` sequences a round at least."""
    return max(1, tokens // batch)


def summary(rows: list[dict], plain: list[dict]) -> dict:
    rate = [r["tokens"] / r["seconds"] for r in rows]
    base = [p["tokens"] / p["seconds"] for p in plain]
    wall = {}
    if "wall_seconds" in rows[0]:
        wall_rate = [r["tokens"] / r["wall_seconds"] for r in rows]
        wall_base = [p["tokens"] / p["wall_seconds"] for p in plain]
        wall = {"wall_decode_tokens_per_s": statistics.median(wall_rate),
                "wall_speedup": statistics.median(a / b for a, b in zip(wall_rate, wall_base))}  # fmt: skip
    return {"decode_tokens_per_s": statistics.median(rate),
            "speedup": statistics.median(a / b for a, b in zip(rate, base)), **wall,
            "acceptance_rate": statistics.median(r["acceptance_rate"] for r in rows),
            "mean_accepted_tokens": statistics.median(r["mean_accepted_tokens"] for r in rows),
            "decode_tokens": statistics.median(r["tokens"] for r in rows)}  # fmt: skip


def one_process(model_path: str, batches, repeats: int, num_tokens: int | None) -> dict:
    from raymoe.model.model import load_model
    from raymoe.model.tokenizer import Tokenizer

    model, tok = load_model(model_path), Tokenizer.from_dir(model_path)
    out = {}
    for workload in PARAMS:
        for batch in batches:
            engines = {m: LLMEngine(model, tok, engine_config(m, batch, num_tokens)) for m in METHODS}
            run = lambda m, t, p: engine_round(engines[m], t, p)  # noqa: E731
            out[f"{workload}/b{batch}"] = compare(run, workload, batch, repeats, waves(batch))
            print(json.dumps({f"{workload}/b{batch}": out[f"{workload}/b{batch}"]}), flush=True)
    return out


def step_cost(model_path: str, batches=(1, 4, 16, 64), lens=(1, 2, 4, 8, 16, 32), context: int = 128) -> dict:
    """ms of one forward + logits of B sequences with q new tokens each after `context` cached ones
    (median of 7), and the ratio to q = 1 (a plain decode step of the same batch)."""
    from raymoe.model.model import load_model

    torch.set_num_threads(1)
    model, bs = load_model(model_path), 16
    out = {}
    for b in batches:
        row = {}
        for q in lens:
            per_seq = -(-(context + q) // bs)
            cache = allocate_kv_cache(model.kv_layout(), b * per_seq, bs, model.dtype)
            tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(b)]
            batch = AttentionBatch.build([q] * b, [context + q] * b, tables, bs)
            ids = torch.randint(3, model.spec.vocab_size, (b * q,))
            row[q] = 1000 * median_time(lambda: model.compute_logits(model.forward(ids, batch, cache)), 7)
        out[f"b{b}"] = {"ms": row, "vs_decode": {q: ms / row[1] for q, ms in row.items()}}
    return out


def median_time(fn, n: int) -> float:
    """Median CPU seconds of this thread over n calls."""
    times = []
    for _ in range(n):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return statistics.median(times)


def on_cluster(model_path: str, batches, repeats: int, num_tokens: int | None, draft_cost: float,
               niceness: int, workloads=tuple(PARAMS), sequences: int = 4) -> dict:  # fmt: skip
    import ray

    os.environ["RAY_worker_niceness"] = str(niceness)  # read by the raylet Ray starts below (its default: 15)

    from raymoe.actors.cluster import MoECluster
    from raymoe.cluster.cluster import ClusterConfig

    ray.init(address="local", num_cpus=8, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}, include_dashboard=False)
    out = {}
    try:
        for workload in workloads:
            for batch in batches:
                clusters = {m: MoECluster(model_path, ClusterConfig(
                    engine=engine_config(m, batch, num_tokens, draft_cost), namespace=f"spec-{workload}-{batch}-{m}",
                    num_shards=2, colocate_experts=False)) for m in METHODS}  # fmt: skip
                try:
                    run = lambda m, t, p: cluster_round(clusters[m], t, p)  # noqa: E731
                    out[f"{workload}/b{batch}"] = compare(run, workload, batch, repeats, waves(batch, sequences))
                finally:
                    for c in clusters.values():
                        c.shutdown()
                print(json.dumps({f"cluster {workload}/b{batch}": out[f"{workload}/b{batch}"]}), flush=True)
    finally:
        ray.shutdown()
    return out


def cluster_round(cluster, texts: list[str], params: SamplingParams) -> dict:
    """The decode worker's pure decode steps (its own timings) for one round."""
    import ray

    worker = cluster.decode[0]
    before = ray.get(worker.stats.remote())["speculative"]
    ray.get(worker.take_timings.remote())
    step = cluster.config.engine.max_num_seqs
    outs = [o for i in range(0, len(texts), step) for o in cluster.generate(texts[i : i + step], params)]
    t, after = ray.get([worker.take_timings.remote(), worker.stats.remote()])
    return {"tokens": t["decode_tokens"], "seconds": t["decode_step_s"], "outputs": [o.token_ids for o in outs],
            **drafts(before, after["speculative"])}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a trained checkpoint folder (default: the shipped built-in model)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--num-speculative-tokens", type=int, default=None, help="default: each drafter's")
    ap.add_argument("--cluster", action="store_true", help="also on a local 2-shard cluster")
    ap.add_argument("--cluster-batches", default="1,4,16,64")
    ap.add_argument("--cluster-repeats", type=int, default=3)
    ap.add_argument("--cluster-draft-cost", type=float, default=0.1, help="engine.speculative_draft_cost there")
    ap.add_argument("--worker-niceness", type=int, default=os.nice(0),
                    help="niceness of Ray's worker processes (Ray's default 15); default: this process's")
    ap.add_argument("--cluster-workloads", default="prose,docqa")
    ap.add_argument("--cluster-sequences", type=int, default=4, help="sequences a cluster round runs at least")
    ap.add_argument("--skip-one-process", action="store_true", help="only the cluster part (with --cluster)")
    ap.add_argument("--out", default="bench/out/speculative.json")
    ap.add_argument("--plot", default=None, help="also draw speed-up against batch size here (a .png)")
    ap.add_argument("--plot-only", action="store_true", help="draw --plot from an earlier --out, run nothing")
    args = ap.parse_args()
    if args.plot_only:
        return plot(json.loads(Path(args.out).read_text()), args.plot)
    if args.model is None:
        from raymoe.model.builtin import builtin_model_path

        args.model = str(builtin_model_path())
    batches = [int(b) for b in args.batches.split(",")]
    result = {"model": args.model, "repeats": args.repeats, "threads": 1, "methods": list(METHODS),
              "num_speculative_tokens": args.num_speculative_tokens}
    if not args.skip_one_process:
        result["step_cost"] = step_cost(args.model)
        result["one_process"] = one_process(args.model, batches, args.repeats, args.num_speculative_tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))  # kept if the cluster part fails
    if args.cluster:
        cluster_batches = [int(b) for b in args.cluster_batches.split(",")]
        result["cluster"] = on_cluster(args.model, cluster_batches, args.cluster_repeats, args.num_speculative_tokens,
                                       args.cluster_draft_cost, args.worker_niceness,
                                       args.cluster_workloads.split(","), args.cluster_sequences)  # fmt: skip
        result["cluster_draft_cost"] = args.cluster_draft_cost
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)


def plot(result: dict, out: str) -> None:
    """Decode speed-up over plain decoding against batch size: one panel per workload, one line per
    drafter and arrangement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PARAMS), figsize=(10, 4), sharey=True)
    for ax, workload in zip(axes, PARAMS):
        for where, style in (("one_process", "-o"), ("cluster", "--s")):
            runs = {int(k.split("/b")[1]): v for k, v in result.get(where, {}).items() if k.startswith(workload)}
            for method, colour in zip(METHODS[1:], ("tab:blue", "tab:orange")):
                batches = sorted(runs)
                ax.plot(batches, [runs[b][method]["speedup"] for b in batches], style, color=colour,
                        label=f"{method}, {where.replace('_', ' ')}")  # fmt: skip
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xscale="log", xlabel="batch size (sequences)", title=workload, xticks=[1, 4, 16, 64], xticklabels=["1", "4", "16", "64"])
    axes[0].set_ylabel("decode tokens/s vs plain decoding (x)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"speculative decoding, {Path(result['model']).name}", fontsize=9)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
