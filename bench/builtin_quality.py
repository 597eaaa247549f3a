"""Quality of the built-in model, measured with raymoe's own model code and one-process engine.

    python bench/builtin_quality.py [--qa 200] [--out bench/out/builtin_quality.json]

- Prose: perplexity on the held-out tenth of `builtin_corpus.txt` (paragraphs training never saw)
  and on grammar prose from a seed training never used, against a bigram baseline counted on the
  training prose with the same tokenizer (interpolated with unigrams; the mixing weight that is
  best on the held-out text, so the baseline's figure is, if anything, flattering).
- Document QA: prompts in the issue-12 format with 2 to 8 documents whose names and values come
  from the held-out pools of `raymoe/model/docqa.py` (ordinary English names, real words; the
  training text never contains them), and made-up ones from a seed training never used; greedy
  decoding in `raymoe.LLM`; exact match = the reply is the value and a newline. Prompts end
  `Answer:` and, separately, `Answer: ` (the reply then has no leading space).
- In-context copying: NLL of a line of made-up words, and of the same line repeated after it.
- Routing: each layer's share of top-k expert picks per task type (prose, document QA, numbers)
  and the total-variation distance between task types' shares (0: same experts, 1: disjoint).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import Counter
from pathlib import Path

import torch

from raymoe.engine.llm import LLM
from raymoe.engine.sampling_params import SamplingParams
from raymoe.model.builtin import EOS_TOKEN, builtin_model_path
from raymoe.model.docqa import CONTRACT_ATTRIBUTES, HELDOUT, TRAIN, CorpusGenerator, prose_split
from raymoe.model.paged import AttentionBatch, allocate_kv_cache

BLOCK = 16


def prefill_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits of every position of one sequence, [L, V], through the paged cache in one chunk."""
    blocks = -(-len(ids) // BLOCK)
    cache = allocate_kv_cache(model.kv_layout(), blocks, BLOCK, torch.float32)
    batch = AttentionBatch.build([len(ids)], [len(ids)], [list(range(blocks))], BLOCK)
    return model.compute_logits(model.forward(torch.tensor(ids), batch, cache))


def model_nll(model, seqs: list[list[int]]) -> tuple[float, int]:
    """(summed NLL in nats, tokens scored) of each sequence's tokens after its first."""
    total, count = 0.0, 0
    for ids in seqs:
        logp = torch.log_softmax(prefill_logits(model, ids), -1)
        total -= float(logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum())
        count += len(ids) - 1
    return total, count


def bigram_nll(train: list[list[int]], test: list[list[int]], vocab: int) -> tuple[float, float]:
    """(perplexity, mixing weight) of the best interpolated bigram on `test`."""
    uni, bi = Counter(), Counter()
    for ids in train:
        uni.update(ids)
        bi.update(zip(ids, ids[1:]))
    ctx = Counter()
    for (a, _), n in bi.items():
        ctx[a] += n
    total = sum(uni.values())
    pairs = [(a, b) for ids in test for a, b in zip(ids, ids[1:])]
    best = None
    for lam in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        nll = 0.0
        for a, b in pairs:
            p_uni = (uni[b] + 0.5) / (total + 0.5 * vocab)
            p_bi = bi[(a, b)] / ctx[a] if ctx[a] else 0.0
            nll -= math.log(lam * p_bi + (1 - lam) * p_uni)
        ppl = math.exp(nll / len(pairs))
        best = min(best or (ppl, lam), (ppl, lam))
    return best


def prose_report(model, tok, eos: int, seed: int) -> dict:
    """Held-out corpus paragraphs, and grammar paragraphs from a seed training never used."""
    def encode(texts):
        return [[eos, *tok.encode(t, add_special_tokens=False)] for t in texts]

    train, heldout = prose_split()
    gen = CorpusGenerator(0, TRAIN)  # the grammar prose the script trained on (its seed)
    train_ids = encode(train + [gen.prose_paragraph() for _ in range(2000)])
    grammar = CorpusGenerator(seed, TRAIN)
    out = {}
    for label, texts in (("corpus_heldout", heldout), ("grammar_new_seed", [grammar.prose_paragraph() for _ in range(40)])):
        enc = encode(texts)
        nll, n = model_nll(model, enc)
        ppl_bigram, lam = bigram_nll(train_ids, enc, tok.vocab_size)
        out[label] = {"paragraphs": len(enc), "tokens": n, "model_perplexity": math.exp(nll / n),
                      "bigram_perplexity": ppl_bigram, "bigram_mixing_weight": lam}  # fmt: skip
    return out


def word_pieces(tok) -> tuple[str, ...]:
    """The vocabulary's letter-only tokens, lower-cased (as tools/train_builtin.py builds names from)."""
    texts = (tok.decode([i]).strip().lower() for i in range(tok.vocab_size))
    return tuple(sorted({t for t in texts if t.isascii() and t.isalpha()}))


def qa_split(llm: LLM, examples: list, suffix: str, lead: str) -> dict:
    """Greedy replies to `examples` (prompt + suffix); exact match = lead + answer + newline."""
    params = SamplingParams(max_tokens=16, temperature=0)
    replies = [o.text for o in llm.generate([e.prompt + suffix for e in examples], params)]
    exact = [r == lead + e.answer + "\n" for r, e in zip(replies, examples)]
    by_docs, by_attr = {}, {}
    for e, ok in zip(examples, exact):
        by_docs.setdefault(e.num_docs, []).append(ok)
        by_attr.setdefault(e.question.split("the ", 1)[1].split(" of ", 1)[0], []).append(ok)
    return {
        "questions": len(exact),
        "exact_match": statistics.mean(exact),
        "first_line_match": statistics.mean(r.split("\n")[0].strip() == e.answer for r, e in zip(replies, examples)),
        "exact_match_2_3_docs": statistics.mean(ok for e, ok in zip(examples, exact) if e.num_docs <= 3),
        "exact_match_4_8_docs": statistics.mean(ok for e, ok in zip(examples, exact) if e.num_docs >= 4),
        "exact_match_by_num_docs": {k: statistics.mean(v) for k, v in sorted(by_docs.items())},
        "exact_match_by_attribute": {k: statistics.mean(v) for k, v in sorted(by_attr.items())},
        "failures": [{"question": e.question, "answer": e.answer, "reply": r, "docs": e.num_docs}
                     for r, e, ok in zip(replies, examples, exact) if not ok][:12],
    }


def qa_report(llm: LLM, n: int, seed: int) -> dict:
    """Held out: ordinary English names and real words the training text never contains, all
    attributes and only the five the issue names; train-like: made-up names and values from a
    seed training never used (new combinations of the pieces it was trained on)."""
    heldout, contract = CorpusGenerator(seed, HELDOUT), CorpusGenerator(seed + 1, HELDOUT)
    fresh = CorpusGenerator(seed + 2, TRAIN, word_pieces(llm.tokenizer))
    sets = {
        "heldout_names_and_values": [heldout.qa() for _ in range(n)],
        "heldout_contract_attributes": [contract.qa(attributes=CONTRACT_ATTRIBUTES) for _ in range(n)],
        "new_combinations": [fresh.qa() for _ in range(n)],
    }
    out = {label: qa_split(llm, examples, "", " ") for label, examples in sets.items()}
    out["heldout_prompt_ends_colon_space"] = qa_split(llm, sets["heldout_names_and_values"], " ", "")
    out["questions_per_set"] = n
    out["documents_per_prompt"] = "2 to 8, uniform"
    return out


def copy_report(model, tok, eos: int, seed: int, n: int = 40) -> dict:
    """In-context copying, the skill document QA rests on: mean NLL per token of a line of made-up
    words (new combinations of the tokenizer's pieces) the first time and when it is repeated."""
    gen = CorpusGenerator(seed, TRAIN, word_pieces(tok))
    first, second = [], []
    for _ in range(n):
        line = " ".join(gen.pseudo_word(2) for _ in range(6))
        a = tok.encode(" " + line, add_special_tokens=False)
        ids = [eos, *a, *tok.encode(".\nAgain:", add_special_tokens=False), *a]
        logp = torch.log_softmax(prefill_logits(model, ids), -1)
        nll = -logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        first.append(float(nll[: len(a)].mean()))
        second.append(float(nll[-len(a) :].mean()))
    return {"lines": n, "nll_first_occurrence": statistics.mean(first), "nll_repeated": statistics.mean(second)}


class RouteTap:
    """Counts each layer's top-k expert picks while installed on a model."""

    def __init__(self, model):
        self.counts: list[Counter] = [Counter() for _ in model.layers]
        for i, layer in enumerate(model.layers):
            layer.ffn.route = self._wrap(layer.ffn.route, i)

    def _wrap(self, route, i):
        def tapped(*args):
            ids, weights = route(*args)
            self.counts[i].update(ids.flatten().tolist())
            return ids, weights

        return tapped

    def shares(self, num_experts: int) -> list[list[float]]:
        return [[c[e] / max(1, sum(c.values())) for e in range(num_experts)] for c in self.counts]


def routing_report(model, tok, eos: int, seed: int) -> dict:
    gen = CorpusGenerator(seed, HELDOUT)
    texts = {
        "prose": prose_split()[1],
        "document_qa": [gen.qa().prompt for _ in range(20)],
        "numbers": [gen.numbers() for _ in range(60)],
    }
    shares = {}
    for task, items in texts.items():
        tap = RouteTap(model)
        for text in items:
            prefill_logits(model, [eos, *tok.encode(text, add_special_tokens=False)])
        shares[task] = tap.shares(model.spec.num_experts)
        for layer in model.layers:  # uninstall: the bound method comes back
            del layer.ffn.route
    tasks = list(shares)
    tv = {f"{a} vs {b}": [0.5 * sum(abs(x - y) for x, y in zip(sa, sb)) for sa, sb in zip(shares[a], shares[b])]
          for i, a in enumerate(tasks) for b in tasks[i + 1 :]}  # fmt: skip
    return {"expert_share_by_task": shares, "total_variation_by_layer": tv}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qa", type=int, default=200, help="held-out document-QA questions")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the built-in model)")
    ap.add_argument("--out", default="bench/out/builtin_quality.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = args.model or builtin_model_path()
    llm = LLM(model=path)
    model, tok = llm.engine.model, llm.tokenizer
    eos = tok.token_to_id(EOS_TOKEN)
    report = {
        "model": str(path) if args.model else "builtin",
        "prose": prose_report(model, tok, eos, args.seed),
        "in_context_copy": copy_report(model, tok, eos, args.seed),
        "document_qa": qa_report(llm, args.qa, args.seed),
        "routing": routing_report(model, tok, eos, args.seed),
    }
    text = json.dumps(report, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
