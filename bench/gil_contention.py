"""Why the engine steps in a process of its own: the engine alone (bench/offline_step.py's workload)
beside Python work that holds the GIL part of the time, in a thread of the same process or in
another process; prints one JSON line per run.

    python bench/gil_contention.py --runs none,thread:0.15,process:0.6,thread:0.15@0.0001 --repeats 2

`thread:D` / `process:D`: a busy loop of pure Python D of each 2 ms, asleep the rest (as an event
loop serving sockets); `@S` sets sys.setswitchinterval(S) first (default 0.005).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import offline_step  # noqa: E402

PERIOD_S = 0.002


def busy(duty: float, stop) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < duty * PERIOD_S:
            sum(i * i for i in range(200))
        time.sleep((1 - duty) * PERIOD_S)


def one_run(spec: str) -> dict:
    spec, _, interval = spec.partition("@")
    kind, _, duty = spec.partition(":")
    sys.setswitchinterval(float(interval or 0.005))
    ctx = mp.get_context("spawn")
    stop = ctx.Event() if kind == "process" else threading.Event()
    worker = None
    if kind == "process":
        worker = ctx.Process(target=busy, args=(float(duty), stop), daemon=True)
    elif kind == "thread":
        worker = threading.Thread(target=busy, args=(float(duty), stop), daemon=True)
    if worker is not None:
        worker.start()
    try:
        result = offline_step.run(128, 64, 128, 32, "float32", 1)
    finally:
        stop.set()
    return {"run": f"{spec}@{interval or 0.005}", "ms_per_step": result["ms_per_step"],
            "full_decode_ms_p50": result["full_decode_ms_p50"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="none,thread:0.15,process:0.6")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    for _ in range(args.repeats):
        for spec in args.runs.split(","):
            print(json.dumps(one_run(spec)), flush=True)


if __name__ == "__main__":
    main()
