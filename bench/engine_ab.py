"""Before/after of raymoe's engine, with transformers, in one run: fixed batches, interleaved rounds.

    python bench/engine_ab.py before=/tmp/raymoe-main after=. [--tasks fixed_1,fixed_8,fixed_32]
        [--rounds 3] [--repeats 2] [--threads 1] [--dtype float32] [--out bench/out/engine_ab.json]

Each NAME=PATH is a raymoe source tree (e.g. `git archive main | tar -x -C /tmp/raymoe-main`), run
as `bench/engine.py --worker raymoe` with PYTHONPATH=PATH; transformers runs too unless
--no-transformers. A round runs every system once per task, one after the other, so on a shared
machine each round's systems see about the same load: the figure to read is the per-round ratio
(`paired_speedup_vs_transformers`, and its median), not the absolute ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent / "engine.py"
ROOT = Path(__file__).resolve().parents[1]


def measure(system: str, path: str, task: str, args, model: str) -> float | None:
    """ms per decode step of one worker process (None: it failed; its stderr is printed)."""
    env = {**os.environ, "PYTHONPATH": path, "RAYMOE_BENCH_THREADS": str(args.threads), "RAYMOE_BENCH_DTYPE": args.dtype}
    cmd = [sys.executable, str(BENCH), "--worker", system, "--model", model, "--task", task, "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        print(system, task, proc.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["ms_per_step"]


def summarise(times: dict[str, list[float]]) -> dict:
    base = times.get("transformers")
    out = {}
    for name, ms in times.items():
        out[name] = {"median_ms": statistics.median(ms), "all_ms": ms} if ms else {"error": "no run finished"}
        if base and name != "transformers" and ms and len(base) == len(ms):
            paired = [b / m for b, m in zip(base, ms)]
            out[name] |= {"paired_speedup_vs_transformers": paired,
                          "median_paired_speedup_vs_transformers": statistics.median(paired)}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="+", help="NAME=PATH of raymoe source trees")
    parser.add_argument("--tasks", default="fixed_32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="per worker (bench/engine.py --repeats)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--model", default=None, help="default: the built-in model")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from raymoe.model.builtin import builtin_model_path

        args.model = str(builtin_model_path())
    variants = dict(v.split("=", 1) for v in args.variants)
    systems = [("raymoe", name, str(Path(path).resolve())) for name, path in variants.items()]
    if not args.no_transformers:
        systems.append(("transformers", "transformers", str(ROOT)))
    times = {task: {name: [] for _, name, _ in systems} for task in args.tasks.split(",")}
    for r in range(args.rounds):
        for task, by_name in times.items():
            for system, name, path in systems:
                ms = measure(system, path, task, args, args.model)
                if ms is not None:
                    by_name[name].append(ms)
                print(f"round {r} {task} {name}: {ms} ms/step", file=sys.stderr, flush=True)
    report = {"config": {**vars(args), "variants": variants},
              "results": {task: summarise(by_name) for task, by_name in times.items()}}  # fmt: skip
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
