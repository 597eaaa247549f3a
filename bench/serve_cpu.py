"""Where `raymoe serve`'s CPU goes at 32 streams: CPU ms per output token of every process of the server.

    python bench/serve_cpu.py --rounds 3 [--env '{"RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}'] [--tree /tmp/before]
    python bench/serve_cpu.py --rounds 3 --arrangements colocated+separate,colocated

Starts the server (backend: engine, max_num_seqs 32), sends the random workload of bench/serve.py
(128-token prompts, 64 output tokens, 32 in flight), and over a window in the middle of the load
reads each process's CPU time from /proc (user + system, every thread) and the engine's counters
(tokens, steps, messages); the engine replica's figure includes its engine process. CPU time, unlike wall time, barely moves with what else the machine runs,
so two settings compare on a shared machine. Each --env entry is one setting (JSON of environment
for the server), and each of --arrangements (bench/serve.py's names: `colocated`, the default, has the
ingress inside the engine replica, so "engine replica" counts the ingress's work too;
`colocated+separate` runs it as a deployment of its own), run in turn
each round; prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
import serve as bench_serve  # noqa: E402
import serve_harness  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[tuple[int, str]]:
    """(pid, command) of pid and all its descendants (the server, its Ray cluster and Serve actors)."""
    rows = [line.split(None, 2) for line in subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True,
                                                           text=True).stdout.splitlines()[1:]]  # fmt: skip
    out, todo = [(pid, "driver")], [pid]
    while todo:
        parent = todo.pop()
        for child, ppid, args in rows:
            if int(ppid) == parent:
                name = "Serve:engine process" if "raymoe.serve.engine_process" in args else args.split()[0]
                out.append((int(child), name.replace("ray::", "")))
                todo.append(int(child))
    return out


def cpu_seconds(procs: list[tuple[int, str]]) -> dict[str, float]:
    """CPU seconds so far per process name (Serve actors by name, Ray's own processes as ray:<binary>)."""
    out: dict[str, float] = collections.Counter()
    for pid, name in procs:
        if not any(s in name for s in ("Serve", "Proxy", "driver", "client")):
            name = "ray:" + name.split("/")[-1][:24]
        try:  # the process's own figure: every thread, those that ended too
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            out[name] += (int(fields[11]) + int(fields[12])) / TICKS
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def one_run(env: dict, tree: str | None, window_s: float, num_requests: int, options: dict | None = None) -> dict:
    config = {**serve_harness.CONFIG, "backend": "engine"}
    config["engine"] = {**config["engine"], "max_num_seqs": 32}
    config["serve"] = {**config["serve"], "max_queue_len": 128}
    options = options or {}
    config = serve_harness.inline_config(config) if options.get("inline") else config
    config = serve_harness.separate_config(config) if options.get("separate") else config
    config = serve_harness.proxied_config(config) if options.get("proxy") else config
    config = {**config, "serve": {**config["serve"], "engine_process": False}} if options.get("thread") else config
    env = {**env, **(bench_serve.tree_env(tree) or {})}
    server = serve_harness.start_server(Path(tempfile.mkdtemp()), config, env=env)
    url, key = server.base_url, serve_harness.API_KEY
    try:
        asyncio.run(bench_serve.run_load(url, key, float("inf"), 32, 32, 16, 1, 128))  # warm-up
        procs = process_tree(server.process.pid) + [(os.getpid(), "client")]
        result: dict = {}
        load = threading.Thread(target=lambda: result.update(
            asyncio.run(bench_serve.run_load(url, key, float("inf"), num_requests, 32, 64, 0, 128))))  # fmt: skip
        load.start()
        time.sleep(5)  # past the first prefills
        cpu0, eng0 = cpu_seconds(procs), bench_serve.engine_counters(url, key)
        time.sleep(window_s)
        cpu1, eng1 = cpu_seconds(procs), bench_serve.engine_counters(url, key)
        load.join()
    finally:
        serve_harness.stop_server(server)
    tokens = eng1["num_generated_tokens"] - eng0["num_generated_tokens"]
    steps = eng1["num_steps"] - eng0["num_steps"]
    per_token = {k: round(1000 * (cpu1[k] - cpu0.get(k, 0.0)) / tokens, 3) for k in cpu1}
    engine = sum(v for k, v in per_token.items() if k.endswith(":engine") or k.endswith("engine process"))
    return {"env": env, "tokens": tokens, "steps": steps,
            "messages_per_step": round((eng1["num_messages"] - eng0["num_messages"]) / max(steps, 1), 2),
            "server_step_ms": round(1000 * (eng1["step_time_s"] - eng0["step_time_s"]) / max(steps, 1), 1),
            "cpu_ms_per_token_engine_replica": engine,
            "cpu_ms_per_token_outside_engine_replica": round(sum(per_token.values()) - engine, 3),
            "cpu_ms_per_token": dict(sorted(per_token.items(), key=lambda kv: -kv[1])),
            "tpot_p50_ms": result["tpot_ms"]["p50"], "output_tok_s": round(result["output_tokens"] / result["elapsed_s"], 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", action="append", default=None, help="JSON environment of the server; repeatable")
    parser.add_argument("--tree", default=None, help="run this source tree's raymoe (PYTHONPATH)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--window", type=float, default=12.0, help="seconds of load measured")
    parser.add_argument("--num-requests", type=int, default=160, help="enough for the load to outlast the window")
    parser.add_argument("--arrangements", default="colocated", help="comma-separated: colocated (the default arrangement), colocated+separate, colocated+inline, "
                        "+proxy (Serve's HTTP proxy in front), +thread (the engine in a thread of its replica)")
    args = parser.parse_args()
    for _ in range(args.rounds):
        for name in args.arrangements.split(","):
            options = bench_serve.arrangement_options(name)[1]
            for env in args.env or ["{}"]:
                run = one_run(json.loads(env), args.tree, args.window, args.num_requests, options)
                print(json.dumps({"arrangement": name, **run}), flush=True)


if __name__ == "__main__":
    main()
