"""Abuse benchmark: do chunk-heavy requests stall everyone else? Bounded load on loopback; prints JSON.

    python bench/abuse.py                          # starts `raymoe serve` (built-in model), then loads it
    python bench/abuse.py --num-normal 48 --repeats 2 --out abuse.json
    python bench/abuse.py --long-prefill-token-threshold 64   # the server's prefills at most 64 tokens a step

Normal traffic is short completions (4 tokens) arriving as a Poisson process, at most
`--max-concurrency` (<= 64) in flight. Two phases alternate on the same server with the same
seed: `baseline` (normal traffic only) and `abuse` (the same traffic, plus every `--abuse-every`-th
arrival an abusive request beside it). The abusive requests are the ones of issue 13:
- `many_spans`: a 1,544-token prompt with `raymoe_chunks` listing 1,536 one-token spans (18 KB);
  it must be refused (400) at once;
- `heavy_chunks`: the most chunk work the limits allow: `max_chunks_per_request` chunks of
  48 tokens, new ones each time (none in the store: each is computed alone), `max_tokens: 1`.
Reported per phase: the normal requests' latency p50/p99 (median over repeats), their ratio
abuse/baseline, and every request's status: nothing may be lost (each normal request answers 200
with its 4 tokens, each abusive one 200 or 400).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import percentile  # noqa: E402

NORMAL_TOKENS = 4
CHUNK_TOKENS = 48
VOCAB = range(10, 1000)  # token ids inside the built-in model's 1024-token vocabulary


def normal_body(model: str) -> dict:
    return {"model": model, "prompt": "Say something short.", "max_tokens": NORMAL_TOKENS, "temperature": 0,
            "ignore_eos": True}  # the trained model may end its text early: always 4 tokens


def abuse_body(model: str, kind: str, rng: random.Random, max_chunks: int) -> dict:
    if kind == "many_spans":
        prompt = [rng.choice(VOCAB) for _ in range(1544)]
        return {"model": model, "prompt": prompt, "max_tokens": 1, "raymoe_chunks": [[t] for t in prompt[4:1540]]}
    chunks = [[rng.choice(VOCAB) for _ in range(CHUNK_TOKENS)] for _ in range(max_chunks)]
    prompt = [1] + [t for c in chunks for t in c] + [rng.choice(VOCAB) for _ in range(7)]
    return {"model": model, "prompt": prompt, "max_tokens": 1, "raymoe_chunks": chunks}


async def timed(client: httpx.AsyncClient, kind: str, body: dict) -> dict:
    start = time.perf_counter()
    try:
        r = await client.post("/v1/completions", json=body)
    except httpx.HTTPError as e:
        return {"kind": kind, "status": type(e).__name__}
    out = {"kind": kind, "status": r.status_code, "latency_s": time.perf_counter() - start}
    if r.status_code == 200:
        out["completion_tokens"] = r.json()["usage"]["completion_tokens"]
    return out


async def phase(client, model: str, abuse: bool, args, seed: int) -> list[dict]:
    rng, limit, tasks = random.Random(seed), asyncio.Semaphore(args.max_concurrency), []

    async def guarded(kind: str, body: dict):
        async with limit:
            return await timed(client, kind, body)

    for i in range(args.num_normal):
        tasks.append(asyncio.create_task(guarded("normal", normal_body(model))))
        if abuse and i % args.abuse_every == 0:
            kind = "many_spans" if (i // args.abuse_every) % 2 else "heavy_chunks"
            tasks.append(asyncio.create_task(guarded(kind, abuse_body(model, kind, rng, args.max_chunks))))
        await asyncio.sleep(rng.expovariate(args.rate))
    return await asyncio.gather(*tasks)


def summarize(results: list[dict]) -> dict:
    normal = [r for r in results if r["kind"] == "normal"]
    ok = [r["latency_s"] for r in normal if r["status"] == 200 and r["completion_tokens"] == NORMAL_TOKENS]
    statuses: dict[str, dict[str, int]] = {}
    for r in results:
        by_kind = statuses.setdefault(r["kind"], {})
        by_kind[str(r["status"])] = by_kind.get(str(r["status"]), 0) + 1
    lost = len(normal) - len(ok) + sum(r["status"] not in (200, 400) for r in results if r["kind"] != "normal")
    ms = lambda v: round(v * 1000, 1)  # noqa: E731
    return {"normal_p50_ms": ms(percentile(ok, 50)), "normal_p99_ms": ms(percentile(ok, 99)),
            "num_normal": len(normal), "statuses": statuses, "lost": lost}  # fmt: skip


async def run(url: str, api_key: str | None, args) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    runs: dict[str, list[dict]] = {"baseline": [], "abuse": []}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await asyncio.gather(*(timed(client, "warmup", normal_body(model)) for _ in range(8)))
        for rep in range(args.repeats):
            for name in ("baseline", "abuse"):
                runs[name].append(summarize(await phase(client, model, name == "abuse", args, args.seed + rep)))
    med = {name: statistics.median(r["normal_p99_ms"] for r in reps) for name, reps in runs.items()}
    return {"load": {k: getattr(args, k) for k in ("num_normal", "rate", "max_concurrency", "abuse_every",
                                                   "max_chunks", "repeats", "seed")},
            "normal_p99_ms_median": med, "p99_ratio_abuse_to_baseline": round(med["abuse"] / med["baseline"], 2),
            "lost": sum(r["lost"] for reps in runs.values() for r in reps), "runs": runs}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=None, help="an already running server; default: start one here")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--num-normal", type=int, default=48, help="normal requests per phase")
    parser.add_argument("--rate", type=float, default=8.0, help="Poisson arrival rate of normal requests, /s")
    parser.add_argument("--max-concurrency", type=int, default=32)
    parser.add_argument("--abuse-every", type=int, default=6, help="an abusive request beside every n-th normal one")
    parser.add_argument("--max-chunks", type=int, default=32, help="the server's serve.max_chunks_per_request")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long-prefill-token-threshold", type=int, default=None,
                        help="the started server's engine.long_prefill_token_threshold (default: its default)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.max_concurrency > 64:
        parser.error("--max-concurrency is at most 64 (a bounded run)")
    if args.url is not None:
        report = asyncio.run(run(args.url, args.api_key, args))
    else:
        report = against_new_server(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def against_new_server(args) -> dict:
    """`raymoe serve` (backend: engine, the tests' config) as a subprocess on a free loopback port."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
    import serve_harness

    engine = dict(serve_harness.CONFIG["engine"])
    if args.long_prefill_token_threshold is not None:
        engine["long_prefill_token_threshold"] = args.long_prefill_token_threshold
    config = {"engine": engine, "serve": {"max_queue_len": 64},
              "ingress": {"num_cpus": 0}, "decode": {"num_cpus": 0}}  # keys older versions know too
    server = serve_harness.start_server(Path(tempfile.mkdtemp()), config)
    try:
        report = asyncio.run(run(server.base_url, serve_harness.API_KEY, args))
    finally:
        serve_harness.stop_server(server)
    report["server"] = {"backend": "engine", "engine": config["engine"]}
    return report


if __name__ == "__main__":
    sys.exit(main())
