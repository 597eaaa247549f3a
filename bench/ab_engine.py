"""Interleaved A/B: raymoe at given PYTHONPATHs and transformers, fixed batches, alternating rounds.
python ab.py --tasks fixed_32 --rounds 3 before=/work/main after=/work/wt-speed"""
import argparse, json, os, statistics, subprocess, sys
ap = argparse.ArgumentParser()
ap.add_argument("--tasks", default="fixed_32"); ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--threads", default="2"); ap.add_argument("--model", default=None)
ap.add_argument("--no-transformers", action="store_true"); ap.add_argument("--out")
ap.add_argument("--dtype", default=None); ap.add_argument("--repeats", default="1")
ap.add_argument("variants", nargs="+")
a = ap.parse_args()
variants = dict(v.split("=", 1) for v in a.variants)
if a.model is None:
    sys.path.insert(0, "/work/wt-speed")
    from raymoe.model.builtin import builtin_model_path
    a.model = str(builtin_model_path())
bench = "/tmp/speed/after3/bench/engine.py"
systems = [("raymoe", k, p) for k, p in variants.items()] + ([] if a.no_transformers else [("transformers", "transformers", "/work/wt-speed")])
res = {t: {name: [] for _, name, _ in systems} for t in a.tasks.split(",")}
for r in range(a.rounds):
    for t in res:
        for sysname, name, path in systems:
            env = {**os.environ, "PYTHONPATH": path, "RAYMOE_BENCH_THREADS": a.threads}
            if a.dtype: env["RAYMOE_BENCH_DTYPE"] = a.dtype
            p = subprocess.run([sys.executable, bench, "--worker", sysname, "--model", a.model, "--task", t, "--repeats", a.repeats],
                               capture_output=True, text=True, env=env)
            if p.returncode:
                print(name, t, p.stderr[-2000:], file=sys.stderr); continue
            ms = json.loads(p.stdout.strip().splitlines()[-1])["ms_per_step"]
            res[t][name].append(ms)
            print(r, t, name, round(ms, 2), file=sys.stderr, flush=True)
summary = {t: {n: {"median_ms": statistics.median(v), "all_ms": v} for n, v in by.items() if v} for t, by in res.items()}
for t, by in summary.items():
    base = res[t].get("transformers")
    for n, v in by.items():
        if base and n != "transformers" and len(base) == len(res[t][n]):
            v["paired_speedup_vs_transformers"] = [b / m for b, m in zip(base, res[t][n])]
            v["median_paired_speedup_vs_transformers"] = statistics.median(v["paired_speedup_vs_transformers"])
text = json.dumps({"threads": a.threads, "rounds": a.rounds, "variants": variants, "results": summary}, indent=1)
print(text)
if a.out: open(a.out, "w").write(text)
