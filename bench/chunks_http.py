"""Chunk reuse over HTTP: document QA sent to `raymoe serve` with the documents in `raymoe_documents`.

    python bench/chunks_http.py [--queries 48] [--docs 16] [--repeats 2] [--out bench/out/chunks_http.json]
    python bench/chunks_http.py --url http://127.0.0.1:8000 --api-key KEY   # a running server

The workload of `bench/chunks.py --workload docqa` (its `docqa_workload`: held-out names and
values, 2 to 8 documents a query, same seed), as text: each query posts to /v1/completions the
question (`Question: What is the <attribute> of <name>?\nAnswer:`) as the prompt and its documents
in `raymoe_documents`, greedy, at most 12 tokens, streamed. Systems, each over all queries in turn on one
server (its prefix cache and chunk store are kept between them, as in production):
- `full prefill`: no documents field; the prompt is the token ids `build_prompt` gives for the
  same parts (the documents inlined exactly where the server would place them): same tokens;
- `chunk reuse 0%`, `15%`, `30%`, `adaptive`: `raymoe_chunk_share` 0, 0.15, 0.3, "adaptive".
Every document is sent once alone beforehand, so its KV is in the server's chunk store.
`--repeats` passes, each over `--queries` new queries (a repeated prompt would hit the prefix
cache), the systems interleaved within a pass. Per system: exact-match accuracy (the reply is
' <value>\n') and greedy agreement with full prefill (replies identical) over every query; the
server's engine step time per query (its backend stats through /admin/cluster: the compute the
server spent: prefill and decode steps), client time to first token and latency (streamed,
medians over queries) and prompt tokens (/metrics `raymoe_prompt_tokens`),
medians over passes. The engine backend exports no chunk counters (tokens recomputed / saved)
over HTTP, so compute shows as server step time; `bench/chunks.py` counts the tokens in process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chunks import QA_MAX_TOKENS, docqa_workload  # noqa: E402

SYSTEMS = (("full prefill", "full"), ("chunk reuse 0%", 0.0), ("chunk reuse 15%", 0.15),
           ("chunk reuse 30%", 0.30), ("chunk reuse adaptive", "adaptive"))  # fmt: skip


class TextTokens:
    """docqa_workload's tokenizer stand-in: a text is one 'token', so its queries come back as text."""

    @staticmethod
    def encode(text: str, add_special_tokens: bool = False) -> list[str]:
        return [text]


def text_workload(num_docs: int, num_queries: int, seed: int):
    """(documents, queries, answers); a query is (documents in prompt order, question), as text."""
    docs, queries, answers = docqa_workload(TextTokens, num_docs, num_queries, seed)
    return [d[0] for d in docs], [([c[0] for c in spans], prompt[-1]) for prompt, spans in queries], answers


def full_prompt_ids(tokenizer, documents: list[str], question: str) -> list[int]:
    """The ids the server builds for raymoe_documents + prompt, with the documents as plain text."""
    from raymoe.engine.chunks import build_prompt
    from raymoe.serve.documents import completion_parts

    ids, _ = build_prompt(tokenizer.encode, completion_parts(question, documents))
    return ids


def body(model: str, tokenizer, documents: list[str], question: str, share) -> dict:
    out = {"model": model, "max_tokens": QA_MAX_TOKENS, "temperature": 0}
    if share == "full":
        return {**out, "prompt": full_prompt_ids(tokenizer, documents, question)}
    return {**out, "prompt": question, "raymoe_documents": documents, "raymoe_chunk_share": share}


def server_counters(client: httpx.Client) -> dict:
    """Engine step time and steps (backend stats via /admin/cluster), prompt tokens (/metrics)."""
    workers = client.get("/admin/cluster").json()["workers"]
    metrics = client.get("/metrics").text
    lines = metrics.splitlines()
    prompt = next(float(line.split()[-1]) for line in lines if line.startswith("raymoe_prompt_tokens_total"))
    return {"step_time_s": sum(w["step_time_s"] for w in workers), "num_steps": sum(w["num_steps"] for w in workers),
            "prompt_tokens": prompt}  # fmt: skip


def ask(client: httpx.Client, request: dict) -> tuple[str, float, float]:
    """(reply, time to first token, latency) of one streamed completion, in seconds."""
    start, first, text = time.perf_counter(), None, []
    with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            first = first or time.perf_counter()
            text += [c["text"] for c in json.loads(line[6:])["choices"]]
    return "".join(text), first - start, time.perf_counter() - start


def run_system(client, model, tokenizer, queries, share) -> dict:
    """All queries one after another; replies, client timings (medians) and the server counters' deltas."""
    before, replies, ttft, latency = server_counters(client), [], [], []
    for documents, question in queries:
        reply, first, last = ask(client, body(model, tokenizer, documents, question, share))
        replies.append(reply)
        ttft.append(first)
        latency.append(last)
    after = server_counters(client)
    n = len(queries)
    return {"replies": replies, "ttft_ms_median": 1000 * statistics.median(ttft),
            "latency_ms_median": 1000 * statistics.median(latency),
            "server_step_ms_per_query": 1000 * (after["step_time_s"] - before["step_time_s"]) / n,
            "server_steps_per_query": (after["num_steps"] - before["num_steps"]) / n,
            "prompt_tokens_per_query": (after["prompt_tokens"] - before["prompt_tokens"]) / n}  # fmt: skip


def run(url: str, api_key: str | None, args) -> dict:
    from raymoe.model.builtin import builtin_model_path
    from raymoe.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(builtin_model_path())
    n = args.queries
    docs, queries, answers = text_workload(args.docs, n * args.repeats, args.seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    runs: dict[str, list[dict]] = {name: [] for name, _ in SYSTEMS}
    with httpx.Client(base_url=url, headers=headers, timeout=300) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        for doc in docs:  # each document's KV into the chunk store (computed alone)
            client.post("/v1/completions", json=body(model, tokenizer, [doc], "Question:", 1.0)).raise_for_status()
        for rep in range(args.repeats):  # new queries each pass: a repeated prompt would hit the prefix cache
            for name, share in SYSTEMS:  # systems interleaved: the machine's load falls on all alike
                runs[name].append(run_system(client, model, tokenizer, queries[rep * n : (rep + 1) * n], share))
    return {"workload": {"queries_per_pass": n, "documents": args.docs, "docs_per_query": "2-8",
                         "seed": args.seed, "max_tokens": QA_MAX_TOKENS},
            "passes": args.repeats, "systems": summarize(runs, answers)}  # fmt: skip


def summarize(runs: dict[str, list[dict]], answers: list[str]) -> dict:
    """Accuracy and agreement over every pass's queries, timings as medians over passes."""
    replies = {name: [t for r in reps for t in r["replies"]] for name, reps in runs.items()}
    results = {}
    for name, reps in runs.items():
        results[name] = {k: statistics.median(r[k] for r in reps) for k in reps[0] if k != "replies"}
        results[name]["answer_exact_match"] = statistics.mean(a == b for a, b in zip(replies[name], answers))
        results[name]["answer_exact_match_per_pass"] = [
            statistics.mean(a == b for a, b in zip(r["replies"], answers[i * len(r["replies"]) :]))
            for i, r in enumerate(reps)]  # fmt: skip
        results[name]["agrees_with_full_prefill"] = statistics.mean(
            a == b for a, b in zip(replies[name], replies["full prefill"]))  # fmt: skip
    full = results["full prefill"]
    for r in results.values():
        r["server_step_time_saved"] = 1 - r["server_step_ms_per_query"] / full["server_step_ms_per_query"]
        r["ttft_ratio_to_full"] = r["ttft_ms_median"] / full["ttft_ms_median"]
    return results


def against_new_server(args) -> dict:
    """`raymoe serve` (engine backend, built-in model, the tests' engine config) on a free loopback port."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
    import serve_harness

    config = {"engine": dict(serve_harness.CONFIG["engine"]), "serve": {"max_queue_len": 64},
              "ingress": {"num_cpus": 0}, "decode": {"num_cpus": 0}}  # fmt: skip
    server = serve_harness.start_server(Path(tempfile.mkdtemp()), config)
    try:
        report = run(server.base_url, serve_harness.API_KEY, args)
    finally:
        serve_harness.stop_server(server)
    report["server"] = {"backend": "engine", "model": "builtin", "engine": config["engine"]}
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None, help="an already running server; default: start one here")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--queries", type=int, default=48)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="passes, each over --queries new queries and every system")
    ap.add_argument("--out", default="bench/out/chunks_http.json")
    args = ap.parse_args(argv)
    report = run(args.url, args.api_key, args) if args.url else against_new_server(args)
    text = json.dumps(report, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
