"""Chunk-cache reuse on a RAG-style workload: full recompute, prefix caching only, and chunk reuse
(CacheBlend-style selective recompute) at several recompute shares, in one run.

    python bench/chunks.py [--workload docqa|corpus] [--repeats 3] [--queries 12] [--out bench/out/chunks.json] [--plot docs/img/chunks.png]

`--workload docqa` (the default): document question answering in the built-in model's format
(raymoe/model/docqa.py, held-out names and values): a pool of one-paragraph documents about
different people, each query 2 to 8 of them in random order and a question about one person;
greedy until the answer's newline (at most 12 tokens); each system's answers are also scored
against the true value (`answer_exact_match`: the reply is exactly ' <value>\n').
`--workload corpus`: the older workload described next.

A pool of documents (slices of the built-in model's corpus, each tokenized alone); each query joins
`--docs-per-query` of them in random order between an instruction and a question. Every system
answers the queries one after another (greedy, 32 tokens) on a fresh engine per repeat; chunk KV is
computed once beforehand (its cost reported as `chunk_precompute_tokens`). Per system: prefill
tokens computed per query (a blend's partial layers counted as whole-token equivalents), time to
first token (median over repeats, mean over queries), and agreement with full recompute: greedy
tokens equal before the first difference over the first 32 (mean share), queries whose 32 tokens all
agree, and the mean KL divergence KL(full || system) of the first token's distribution.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from raymoe.engine.chunk_cache import LocalChunkStore
from raymoe.engine.chunks import ChunkReuse
from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.engine.sampling_params import SamplingParams

SHARES = (0.0, 0.15, 0.30)  # 0: reuse the chunks' KV as computed alone, no repair
NEW_TOKENS = 32
QA_MAX_TOKENS = 12
INSTRUCTION = "Use the documents below to answer the question.\n"
CONFIG = EngineConfig(max_num_seqs=4, max_num_batched_tokens=1024, block_size=16, kv_cache_bytes=64 << 20)


def workload(tokenizer, num_docs: int, doc_tokens: int, num_queries: int, per_query: int, seed: int):
    """(documents, queries); a query is (token ids, ChunkReuse spans in prompt order)."""
    from importlib import resources

    text = resources.files("raymoe.model").joinpath("builtin_corpus.txt").read_text()
    ids = tokenizer.encode(text, add_special_tokens=False)
    step = max(doc_tokens, (len(ids) - 64 * num_queries) // num_docs)
    docs = [ids[i * step : i * step + doc_tokens] for i in range(num_docs)]
    rng = random.Random(seed)
    head = tokenizer.encode(INSTRUCTION, add_special_tokens=False)
    queries = []
    for q in range(num_queries):
        picked = rng.sample(range(num_docs), per_query)
        start = rng.randrange(0, len(ids) - 16)
        question = tokenizer.encode("\nQuestion: ", add_special_tokens=False) + ids[start : start + 12]
        prompt = head + [t for d in picked for t in docs[d]] + question
        queries.append((prompt, tuple(tuple(docs[d]) for d in picked)))
    return docs, queries


def docqa_workload(tokenizer, num_docs: int, num_queries: int, seed: int):
    """(documents, queries, answers): held-out document-QA; a query is (token ids, chunk spans)."""
    from raymoe.model.docqa import ATTRIBUTES, HELDOUT, CorpusGenerator

    gen, rng = CorpusGenerator(seed, HELDOUT), random.Random(seed)
    people: dict[str, dict[str, str]] = {}
    while len(people) < num_docs:
        name = gen.name()
        if name.split()[0] not in {n.split()[0] for n in people}:  # no "David" beside "David Smith"
            people[name] = {a: gen.value(a) for a in rng.sample(ATTRIBUTES, rng.randint(2, 6))}
    names = list(people)
    docs = [tokenizer.encode(gen.document(n, people[n]) + "\n", add_special_tokens=False) for n in names]
    queries, answers = [], []
    for _ in range(num_queries):
        picked = rng.sample(range(num_docs), rng.randint(2, min(8, num_docs)))
        target = names[rng.choice(picked)]
        attribute = rng.choice(sorted(people[target]))
        question = f"Question: What is the {attribute} of {target}?\nAnswer:"
        prompt = [t for d in picked for t in docs[d]] + tokenizer.encode(question, add_special_tokens=False)
        queries.append((prompt, tuple(tuple(docs[d]) for d in picked)))
        answers.append(" " + people[target][attribute] + "\n")
    return docs, queries, answers


class LogitTap:
    """Records the logits rows the model computes (the first token's distribution)."""

    def __init__(self, model):
        self.rows: list[torch.Tensor] = []
        inner = model.compute_logits

        def tapped(hidden):
            logits = inner(hidden)
            self.rows.append(logits.detach().clone())
            return logits

        model.compute_logits = tapped


def run_query(engine: LLMEngine, tap: LogitTap, prompt, reuse, answer_mode: bool = False) -> dict:
    """One greedy request alone on the engine: TTFT, prefill tokens computed, tokens, first logits.
    answer_mode: up to 12 tokens, ending at end of text (document QA); else NEW_TOKENS, ignoring it."""
    if answer_mode:
        params = SamplingParams(temperature=0, max_tokens=QA_MAX_TOKENS, chunk_reuse=reuse)
    else:
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, chunk_reuse=reuse)
    before = engine.chunk_stats()["computed_tokens"]
    tap.rows.clear()
    start = time.perf_counter()
    engine.add_request(prompt, params, "q")
    tokens, ttft, prefill = [], None, None
    while engine.has_unfinished():
        for delta in engine.step():
            if ttft is None:
                ttft = time.perf_counter() - start
                prefill = engine.chunk_stats()["computed_tokens"] - before
            tokens += delta.token_ids
    return {"ttft_s": ttft, "prefill_tokens": prefill, "tokens": tokens, "logits": tap.rows[0][0]}


def fresh_engine(model, store) -> LLMEngine:
    """A new engine with its KV cache memory touched (page faults are not prefill time)."""
    engine = LLMEngine(model, None, CONFIG, store)
    for k, v in engine.model_runner.kv_cache:
        k.fill_(0)
        v.fill_(0)
    return engine


def run_system(model, tap, queries, share, kind: str, store, answer_mode: bool) -> list[dict]:
    """All queries in order on a fresh engine; full recompute drops the prefix cache between them."""
    engine, out = fresh_engine(model, store), []
    for prompt, docs in queries:
        if kind == "full":
            engine.block_manager.hash_to_block_id.clear()
        reuse = ChunkReuse(docs, share) if kind == "chunks" else None
        out.append(run_query(engine, tap, prompt, reuse, answer_mode))
    return out


def precompute(model, tap, store, docs) -> float:
    """Store every document's KV (computed on its own); returns the tokens computed."""
    engine = LLMEngine(model, None, CONFIG, store)
    for doc in docs:
        run_query(engine, tap, list(doc) + [doc[0]], ChunkReuse([doc], 1.0))
    return engine.chunk_stats()["chunk_prefill_tokens"]


def agreement(runs: list[dict], reference: list[dict]) -> dict:
    """token_agreement: mean share of the reference's greedy tokens matched before the first
    difference; all_tokens_agree: share of queries whose tokens all equal the reference's."""
    prefix, exact, kls = [], 0, []
    for got, ref in zip(runs, reference):
        n = len(ref["tokens"])
        same = next((i for i, (a, b) in enumerate(zip(got["tokens"], ref["tokens"])) if a != b), min(n, len(got["tokens"])))
        prefix.append(same / n)
        exact += got["tokens"] == ref["tokens"]
        p, q = torch.log_softmax(ref["logits"], -1), torch.log_softmax(got["logits"], -1)
        kls.append(float((p.exp() * (p - q)).sum()))
    return {"token_agreement": statistics.mean(prefix), "all_tokens_agree": exact / len(runs),
            "first_token_kl": statistics.mean(kls)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the built-in model)")
    ap.add_argument("--workload", choices=("docqa", "corpus"), default="docqa")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--queries", type=int, default=12)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--doc-tokens", type=int, default=96)
    ap.add_argument("--docs-per-query", type=int, default=4)
    ap.add_argument("--out", default="bench/out/chunks.json")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from raymoe.model.builtin import builtin_model_path
    from raymoe.model.model import load_model
    from raymoe.model.tokenizer import Tokenizer

    path = args.model or builtin_model_path()
    model, tokenizer = load_model(path), Tokenizer.from_dir(path)
    tap = LogitTap(model)
    answer_mode = args.workload == "docqa"
    if answer_mode:
        docs, queries, answers = docqa_workload(tokenizer, args.docs, args.queries, 0)
    else:
        docs, queries = workload(tokenizer, args.docs, args.doc_tokens, args.queries, args.docs_per_query, 0)
    store = LocalChunkStore(256 << 20)
    chunk_tokens = precompute(model, tap, store, docs)
    systems = [("full recompute", "full", None), ("prefix caching", "prefix", None)]
    systems += [(f"chunk reuse {int(s * 100)}%", "chunks", s) for s in SHARES]
    systems += [("chunk reuse adaptive", "chunks", None)]
    results, reference = {}, None
    for name, kind, share in systems:
        repeats = [run_system(model, tap, queries, share, kind, store, answer_mode) for _ in range(args.repeats)]
        first = repeats[0]
        reference = reference or first
        ttft = [statistics.median(r[i]["ttft_s"] for r in repeats) for i in range(len(queries))]
        results[name] = {
            "prefill_tokens_per_query": statistics.mean(q["prefill_tokens"] for q in first),
            "ttft_ms": 1000 * statistics.mean(ttft),
            **agreement(first, reference),
        }
        if answer_mode:
            replies = [tokenizer.decode(q["tokens"]) for q in first]
            results[name]["answer_exact_match"] = statistics.mean(r == a for r, a in zip(replies, answers))
    full = results["full recompute"]["prefill_tokens_per_query"]
    for r in results.values():
        r["compute_saved"] = 1 - r["prefill_tokens_per_query"] / full
    setup = {"workload": args.workload, "documents": args.docs, "queries": args.queries,
             "doc_tokens": statistics.mean(map(len, docs)) if answer_mode else args.doc_tokens,
             "docs_per_query": "2-8" if answer_mode else args.docs_per_query,
             "new_tokens": f"until end of text, at most {QA_MAX_TOKENS}" if answer_mode else NEW_TOKENS,
             "prompt_tokens_mean": statistics.mean(len(p) for p, _ in queries)}  # fmt: skip
    report = {
        "model": str(path) if args.model else "builtin",
        "workload": setup,
        "repeats": args.repeats,
        "chunk_precompute_tokens": chunk_tokens,
        "chunk_store": store.stats(),
        "systems": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    if args.plot:
        plot(results, args.plot)


def plot(results: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        x = 100 * r["compute_saved"]
        axes[0].scatter(x, 100 * r["token_agreement"], label=name)
        axes[1].scatter(x, r["first_token_kl"], label=name)
    axes[0].set(xlabel="prefill compute saved vs full recompute (%)", ylabel="greedy tokens agreeing (%)",
                title="agreement with full recompute (first 32 tokens)")  # fmt: skip
    axes[1].set(xlabel="prefill compute saved vs full recompute (%)", ylabel="KL(full || system), first token",
                title="first-token distribution")  # fmt: skip
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
