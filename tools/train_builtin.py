"""Train raymoe's built-in model from scratch and write it as a Hugging Face folder.

    nice -n 5 python tools/train_builtin.py --out /tmp/builtin --save-every 100 --plot docs/img/builtin_training.png

Deterministic for a given --threads and arguments: the tokenizer, the text (raymoe/model/docqa.py)
and the weights all come from fixed seeds. A curriculum (`STAGES`): short rows with 2-3 documents
first, so that copying from the context forms while steps are cheap, then longer rows with up to 8
documents. Names and values in training are built from syllables spanning the alphabet and from
the tokenizer's own word pieces, so copying is learnt on every token; the evaluation uses ordinary
English names and real words the training text never contains. Writes config.json,
generation_config.json, model.safetensors (named as raymoe's builtin.weight_shapes),
tokenizer.json, tokenizer_config.json, plus train_log.jsonl and, with --plot, the loss curve.
transformers is used here only, for its Qwen3MoeForCausalLM; raymoe serves the result itself.

Status (docs/benchmarks.md): the shipped built-in model is this script's defaults to step 12000
(`--steps 12000`, 1 thread, about 2 hours on this 2-core machine when shared, 0.25 s per step alone),
continued with the command below to step 15000 (49 minutes, shared).

Continuing a run from a checkpoint, deterministically (`--init-from DIR --start-step N`): the
weights, config and tokenizer come from DIR, AdamW starts fresh with a short warm-up
(`--resume-warmup`), the learning rate follows the same schedule from step N (optionally decayed
linearly to zero by --steps: `--cooldown`), and the text stream is seeded by N (`data_seed`), so a
continuation is reproducible from its command alone:

    nice -n 5 python tools/train_builtin.py --init-from /tmp/builtin/step12000 --start-step 12000 \
        --steps 15000 --cooldown --qa-share 0.9 --no-space-share 0.4 --corpus-words --out /tmp/builtin-c3
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raymoe.model import builtin  # noqa: E402
from raymoe.model.docqa import HELDOUT, TRAIN, CorpusGenerator, prose_split  # noqa: E402

ARCHITECTURE = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=192,
    intermediate_size=512,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
VOCAB_SIZE = 1024
# (row length, rows per step, documents per QA example); which one a step uses: stage_at
SHORT, MEDIUM, LONG = (256, 8, (2, 3)), (512, 4, (2, 5)), (1024, 2, (2, 8))
LONG_FROM = 1000  # from this step on, half the steps are long, half medium
CONSTANT_UNTIL = 1000  # the learning rate is constant up to here, then falls as 1/sqrt(step)
QA_SHARE = 0.8  # of examples; the rest is prose (3/4) and numbers (1/4)
NO_SPACE_SHARE = 0.2  # of answers, those whose prompt ends 'Answer: ' (the answer then has no leading space)
MAX_QUIZ = 6  # extra training questions per QA example (more copy supervision per context token)
RESTATE_SHARE = 0.5  # of the extra questions, those asked as the document's own sentence, to be completed
CONTEXT_WEIGHT = 0.5  # loss weight of document and question tokens
ANSWER_WEIGHT = 4.0  # loss weight of an answer's tokens (the copy the model must learn)


def train_tokenizer(seed: int, vocab_size: int) -> Tokenizer:
    """Byte-level BPE with single-digit tokens, trained on the corpus and generated text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(builtin.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    gen = CorpusGenerator(seed, TRAIN)
    texts = prose_split()[0] + [gen.qa().prompt for _ in range(1000)] + [gen.prose_paragraph() for _ in range(2000)]
    texts += [gen.numbers() for _ in range(300)]
    tok.train_from_iterator(texts, trainer)
    return tok


def word_pieces(tok: Tokenizer) -> tuple[str, ...]:
    """The vocabulary's letter-only tokens, lower-cased, without their leading space."""
    pieces = set()
    for token_id in range(tok.get_vocab_size()):
        text = tok.decode([token_id]).strip().lower()
        if text.isascii() and text.isalpha():
            pieces.add(text)
    return tuple(sorted(pieces))


def corpus_words() -> tuple[str, ...]:
    """Lower-case words (3+ letters) of the training prose, less every held-out name and value:
    extra pieces for training names and values, so that copying real words' tokens is practised."""
    from raymoe.model import docqa

    words = {w.lower() for text in prose_split()[0] for w in re.findall(r"[A-Za-z]{3,}", text)}
    held = {w.lower() for w in docqa._HELDOUT_FIRST + docqa._HELDOUT_LAST}
    held |= {w.lower() for pools in docqa._WORDS.values() for w in pools[1]}
    return tuple(sorted(words - held))


class Batches:
    """Rows of token ids packed with whole examples (each ending in <|endoftext|>).

    next() gives (ids (B, L) int64, weights (B, L) float32): weights[t] is the loss weight of
    predicting ids[t + 1] (0 on padding). `stage(seq_len, rows, docs)` sets the shape and the
    number of documents of what follows.
    """

    def __init__(self, tok: Tokenizer, seed: int, pieces: tuple[str, ...], qa_share: float, restate_share: float,
                 no_space_share: float = NO_SPACE_SHARE):  # fmt: skip
        self.tok, self.restate_share, self.no_space_share = tok, restate_share, no_space_share
        self.mix = (("qa", qa_share), ("prose", 0.75 * (1 - qa_share)), ("numbers", 0.25 * (1 - qa_share)))
        self.gen = CorpusGenerator(seed, TRAIN, pieces)
        self.rng = random.Random(seed + 1)
        self.prose = prose_split()[0]
        self.eos = tok.token_to_id(builtin.EOS_TOKEN)
        self.seq_len, self.rows, self.docs = 256, 8, (2, 3)
        self.easy: tuple[int, int] | None = None
        self._pending: tuple[list[int], list[float]] | None = None

    def stage(self, seq_len: int, rows: int, docs: tuple[int, int]) -> None:
        self.seq_len, self.rows, self.docs = seq_len, rows, docs
        if self._pending is not None and len(self._pending[0]) >= seq_len:
            self._pending = None

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def qa_example(self) -> tuple[list[int], list[float]]:
        easy = self.easy  # (max facts, max fillers) per document, or None: the contract's 6 and 3
        qa = self.gen.qa(self.rng.randint(*self.docs), max_facts=easy[0], max_fillers=easy[1]) if easy else self.gen.qa(self.rng.randint(*self.docs))
        ids = self._encode("\n".join(qa.documents) + "\n")
        w = [CONTEXT_WEIGHT] * len(ids)
        pairs = self.gen.quiz(qa, self.rng.randint(0, MAX_QUIZ)) + [(qa.question, qa.answer)]
        for i, (question, value) in enumerate(pairs):
            if i < len(pairs) - 1 and self.restate_share and self.rng.random() < self.restate_share:
                # "The <attribute> of <name> is" -> " <value>.": the document's own words, a plain copy
                prompt = self._encode(question.replace("Quiz: What is the", "The").rstrip("?") + " is")
                answer = self._encode(" " + value + ".\n")
                ids += prompt + answer
                w += [CONTEXT_WEIGHT] * len(prompt) + [ANSWER_WEIGHT] * len(answer)
                continue
            space = self.rng.random() >= self.no_space_share  # most prompts end "Answer:" (the answer carries its space)
            prompt = self._encode(question + "\nAnswer:" + ("" if space else " "))
            answer = self._encode((" " if space else "") + value + "\n")
            ids += prompt + answer
            w += [CONTEXT_WEIGHT] * len(prompt) + [ANSWER_WEIGHT] * len(answer)
        return ids + [self.eos], w + [ANSWER_WEIGHT]

    def example(self) -> tuple[list[int], list[float]]:
        """(ids, weights) of one example; weights[i] weighs predicting ids[i]."""
        r, acc, kind = self.rng.random(), 0.0, "qa"
        for kind, share in self.mix:
            acc += share
            if r < acc:
                break
        if kind == "qa":
            return self.qa_example()
        if kind == "prose":
            text = self.rng.choice(self.prose) if self.rng.random() < 0.5 else self.gen.prose_paragraph()
        else:
            text = self.gen.numbers()
        ids = self._encode(text)[: self.seq_len - 2] + [self.eos]
        return ids, [1.0] * len(ids)

    def row(self) -> tuple[list[int], list[float]]:
        ids, w = [self.eos], [0.0]  # a row starts with <|endoftext|> as context
        while True:
            ex = self._pending or self.example()
            self._pending = None
            if len(ids) + len(ex[0]) > self.seq_len:
                self._pending = ex if len(ex[0]) < self.seq_len else None
                if len(ids) > 1 or self._pending is not None:
                    break
                continue  # an example longer than a row: drawn again
            ids += ex[0]
            w += ex[1]
        pad = self.seq_len - len(ids)
        return ids + [self.eos] * pad, w + [0.0] * pad

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.row() for _ in range(self.rows)]
        ids = torch.tensor([r[0] for r in rows])
        w = torch.tensor([r[1] for r in rows])
        return ids, torch.cat([w[:, 1:], torch.zeros(len(rows), 1)], dim=1)


def hf_from_raymoe(weights: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The inverse of hf_to_raymoe: one tensor per expert -> transformers 5's fused expert tensors."""
    out, experts = {}, {}
    for name, t in weights.items():
        head, sep, tail = name.partition(".mlp.experts.")
        if not sep:
            out[name] = t
            continue
        e, proj = tail.split(".", 1)
        experts.setdefault(head, {}).setdefault(proj, {})[int(e)] = t
    for head, projs in experts.items():
        n = len(projs["down_proj.weight"])
        gate_up = [torch.cat([projs["gate_proj.weight"][e], projs["up_proj.weight"][e]]) for e in range(n)]
        out[f"{head}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        out[f"{head}.mlp.experts.down_proj"] = torch.stack([projs["down_proj.weight"][e] for e in range(n)])
    return out


def load_checkpoint(folder: Path):
    """(model, tokenizer, config) of a folder this script wrote."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("torch_dtype", "dtype")}
    model = make_model(config)
    missing, unexpected = model.load_state_dict(hf_from_raymoe(load_file(str(folder / "model.safetensors")), config), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight" or not config.get("tie_word_embeddings")]:
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model, Tokenizer.from_file(str(folder / "tokenizer.json")), config


def data_seed(seed: int, start_step: int) -> int:
    """Seed of the text stream of a run starting at `start_step` (0: the original run's own seed)."""
    return seed if start_step == 0 else seed + 1_000_000 + start_step


def make_model(config: dict):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "sdpa"
    return Qwen3MoeForCausalLM(cfg)


def hf_to_raymoe(state: dict[str, torch.Tensor], config: dict, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """transformers 5's fused expert tensors -> one tensor per expert, as builtin.weight_shapes names them."""
    out = {}
    inter = config["moe_intermediate_size"]
    for name, t in state.items():
        t = t.detach().to(dtype).contiguous()
        if name.endswith("mlp.experts.gate_up_proj"):
            p = name[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                out[f"{p}{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{p}{e}.up_proj.weight"] = t[e, inter:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            p = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{p}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t
    expected = builtin.weight_shapes(config)
    if set(out) != set(expected) or any(tuple(out[k].shape) != s for k, s in expected.items()):
        raise RuntimeError(f"weight names/shapes differ from builtin.weight_shapes: {sorted(set(out) ^ set(expected))[:5]}")
    return {k: out[k] for k in expected}


@torch.no_grad()
def qa_eval(model, tok: Tokenizer, gen: CorpusGenerator, n: int, docs: tuple[int, int]) -> dict:
    """Exact match (every answer token, then the newline, is the argmax = greedy decoding) and the
    answer tokens' mean NLL over n prompts ending 'Answer:' with `docs` documents."""
    model.eval()
    hits, nll, count = 0, 0.0, 0
    for _ in range(n):
        qa = gen.qa(gen.rng.randint(*docs))
        prompt = tok.encode(qa.prompt, add_special_tokens=False).ids
        answer = tok.encode(" " + qa.answer + "\n", add_special_tokens=False).ids
        logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
        hits += int(logits.argmax(-1).tolist() == answer)
        nll += float(F.cross_entropy(logits, torch.tensor(answer), reduction="sum"))
        count += len(answer)
    model.train()
    return {"em": hits / n, "nll": round(nll / count, 3)}


def step_loss(model, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted next-token CE, router load-balancing loss); logits only where the weight is > 0."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    res = model.model(ids, output_router_logits=True)
    keep = weights.flatten() > 0
    hidden = res.last_hidden_state.flatten(0, 1)[keep]
    targets = ids.roll(-1, dims=1).flatten()[keep]
    ce = F.cross_entropy(model.lm_head(hidden), targets, reduction="none")
    w = weights.flatten()[keep]
    cfg = model.config
    aux = load_balancing_loss_func(res.router_logits, cfg.num_experts, cfg.num_experts_per_tok)
    return (ce * w).sum() / w.sum(), aux


def lr_at(step: int, peak: float, warmup: int) -> float:
    """Linear warm-up, constant, then inverse square root from CONSTANT_UNTIL: independent of the
    run's length, so the weights after N steps of a longer run equal those of a run with --steps N."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * min(1.0, math.sqrt(CONSTANT_UNTIL / (step + 1)))


def resumed_lr(step: int, args) -> float:
    """lr_at, ramped up over --resume-warmup steps after --start-step (a fresh AdamW), and with
    --cooldown multiplied by a linear decay that reaches zero at --steps."""
    lr = lr_at(step, args.lr, args.warmup) * min(1.0, (step - args.start_step + 1) / args.resume_warmup)
    if args.cooldown:
        lr *= (args.steps - step) / (args.steps - args.start_step)
    return lr


def stage_at(step: int) -> tuple[int, int, tuple[int, int]]:
    """Short rows with 2-3 documents most of the time at first (copying forms while steps are
    cheap), with medium and long ones mixed in from the start; after LONG_FROM medium and long."""
    if step >= LONG_FROM:
        return LONG if step % 2 else MEDIUM
    return {3: LONG, 1: MEDIUM}.get(step % 4, SHORT)


def evaluate(model, tok, pieces, seed: int, n: int, long: bool) -> dict:
    out = {
        "train_2_3": qa_eval(model, tok, CorpusGenerator(seed, TRAIN, pieces), n, (2, 3)),
        "heldout_2_3": qa_eval(model, tok, CorpusGenerator(seed, HELDOUT), n, (2, 3)),
    }
    if long:
        out["heldout_2_8"] = qa_eval(model, tok, CorpusGenerator(seed + 1, HELDOUT), n, (2, 8))
    return out


def train(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.init_from:
        model, tok, config = load_checkpoint(Path(args.init_from))
        pieces = word_pieces(tok)
    else:
        model, tok, config, pieces = fresh_model(args)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))  # fmt: skip
    if args.corpus_words:
        pieces += corpus_words()
    batches = Batches(tok, data_seed(args.seed, args.start_step), pieces, args.qa_share, args.restate_share, args.no_space_share)
    log = (out / "train_log.jsonl").open("w")
    print(f"params {params / 1e6:.2f}M vocab {tok.get_vocab_size()} pieces {len(pieces)}", flush=True)
    start = time.time()
    for step in range(args.start_step, args.steps):
        seq_len, rows, docs = stage_at(step) if step >= args.easy_until else SHORT
        batches.easy = (3, 0) if step < args.easy_until else None  # warm-up: short documents, no filler
        batches.stage(seq_len, max(1, int(rows * args.rows_scale)), docs)
        ids, weights = next(batches)
        for group in opt.param_groups:
            group["lr"] = resumed_lr(step, args) if args.start_step else lr_at(step, args.lr, args.warmup)
        loss, aux = step_loss(model, ids, weights)
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        entry = {"step": step + 1, "loss": round(loss.item(), 4), "aux": round(aux.item(), 4),
                 "seq_len": batches.seq_len, "lr": round(opt.param_groups[0]["lr"], 7),
                 "elapsed_s": round(time.time() - start, 1)}  # fmt: skip
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            last = step + 1 == args.steps
            entry["eval"] = evaluate(model, tok, pieces, args.seed + 7, args.eval_n, last or (step + 1) % 500 == 0)
        log.write(json.dumps(entry) + "\n")
        log.flush()
        if (step + 1) % 20 == 0 or "eval" in entry:
            print(json.dumps(entry), flush=True)
        if args.save_every and (step + 1) % args.save_every == 0:
            save(model, tok, config, out / f"step{step + 1}")
    save(model, tok, config, out)
    if args.plot:
        plot([Path(p) for p in args.prior_log] + [out / "train_log.jsonl"], Path(args.plot))


def fresh_model(args):
    """(model, tokenizer, config, word pieces) of a run from scratch."""
    tok = train_tokenizer(args.seed, args.vocab)
    eos = tok.token_to_id(builtin.EOS_TOKEN)
    shape = dict(ARCHITECTURE, hidden_size=args.hidden, head_dim=args.head_dim, moe_intermediate_size=args.moe_inter)
    config = builtin.model_config(tok.get_vocab_size(), bos_token_id=eos, eos_token_id=eos, architecture=shape)
    model = make_model(config)
    with torch.no_grad():  # a larger gain lets attention be sharp (pick one document among many) early
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.fill_(args.qk_norm_init)
    return model, tok, config, word_pieces(tok)


def save(model, tok: Tokenizer, config: dict, out: Path, dtype=torch.float32) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in builtin.SPECIAL_TOKENS}
    saved = dict(config, torch_dtype=str(dtype).removeprefix("torch."), dtype=str(dtype).removeprefix("torch."))
    builtin._write_json(out / "config.json", saved)
    builtin._write_json(out / "generation_config.json", builtin._generation_config(ids))
    builtin._write_json(out / "tokenizer_config.json", builtin._tokenizer_config())
    save_file(hf_to_raymoe(model.state_dict(), config, dtype), str(out / "model.safetensors"), metadata={"format": "pt"})


def plot(log_paths: list[Path], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for path in log_paths for line in path.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.6, label="training loss (weighted CE)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ev = [r for r in rows if "eval" in r]
    ax2 = ax.twinx()
    for key, style in (("train_2_3", "o-"), ("heldout_2_3", "s-"), ("heldout_2_8", "^-")):
        pts = [(r["step"], r["eval"][key]["em"]) for r in ev if key in r["eval"]]
        ax2.plot(*zip(*pts), style, ms=3, label=f"QA exact match {key}")
    ax2.set_ylabel("QA exact match")
    ax2.set_ylim(0, 1)
    fig.legend(loc="upper center", ncol=2, fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab", type=int, default=VOCAB_SIZE)
    p.add_argument("--qa-share", type=float, default=QA_SHARE)
    p.add_argument("--hidden", type=int, default=ARCHITECTURE["hidden_size"])
    p.add_argument("--head-dim", type=int, default=ARCHITECTURE["head_dim"])
    p.add_argument("--moe-inter", type=int, default=ARCHITECTURE["moe_intermediate_size"])
    p.add_argument("--rows-scale", type=float, default=1.0, help="rows per step, as a multiple of the stages'")
    p.add_argument("--restate-share", type=float, default=RESTATE_SHARE)
    p.add_argument("--no-space-share", type=float, default=NO_SPACE_SHARE, help="of answers, those after 'Answer: '")
    p.add_argument("--corpus-words", action="store_true", help="build names and values from the prose's words too")
    p.add_argument("--easy-until", type=int, default=0, help="steps of warm-up: short rows, 2-3 documents of 2-3 facts, no filler")
    p.add_argument("--qk-norm-init", type=float, default=1.0, help="initial gain of the query and key RMSNorms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-n", type=int, default=40)
    p.add_argument("--save-every", type=int, default=0, help="also write the model every N steps (out/stepN)")
    p.add_argument("--plot", default=None, help="write the loss curve PNG here")
    p.add_argument("--prior-log", action="append", default=[], help="train_log.jsonl of earlier steps, for the plot")
    p.add_argument("--init-from", default=None, help="continue from this checkpoint folder (weights, tokenizer)")
    p.add_argument("--start-step", type=int, default=0, help="the step --init-from was saved at")
    p.add_argument("--resume-warmup", type=int, default=100, help="lr warm-up steps of the fresh AdamW")
    p.add_argument("--cooldown", action="store_true", help="decay the lr linearly to zero at --steps")
    train(p.parse_args())


if __name__ == "__main__":
    main()
