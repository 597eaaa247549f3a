"""Train raymoe's built-in model from scratch and write it as a Hugging Face folder.

    nice -n 5 python tools/train_builtin.py --out /tmp/builtin --save-every 50 --plot /tmp/builtin.png

Deterministic for a given --threads: the tokenizer, the text (raymoe/model/docqa.py) and the weights
all come from fixed seeds, and the learning rate depends only on the step, so the weights after N
steps of a longer run equal those of a run with --steps N. Two phases: up to --phase2-step the
mixed text (60% document QA, prose, numbers); from there a fresh optimizer and 90% document QA,
half of it with 2-4 documents. --resume stepN (N = --phase2-step) continues a run from its saved
phase-1 weights (the data is replayed to step N). Status (docs/benchmarks.md): the default 750
steps do NOT yet teach the model to answer document questions; no weights are shipped. Writes
config.json, generation_config.json, model.safetensors (float32, named as transformers saves
Qwen3MoeForCausalLM), tokenizer.json, tokenizer_config.json, plus train_log.jsonl (loss, held-out
document-QA exact match) and, with --plot, the loss curve. transformers is used here only, for
its Qwen3MoeForCausalLM; raymoe serves the result with its own model code.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
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
VOCAB_SIZE = 2048
SEQ_LEN = 768
QA_SHARE = 0.6  # of examples; the rest is prose (3/4) and numbers (1/4)
NO_SPACE_SHARE = 0.5  # of QA answers, those whose prompt ends 'Answer: ' (the answer then has no leading space)
MAX_QUIZ = 4  # extra training questions per QA example (more copy supervision per context token)
ANSWER_WEIGHT = 3.0
PHASE2_STEP = 500  # from here: a fresh optimizer and mostly document QA, half of it with 2-4 documents
PHASE2_QA_SHARE = 0.9  # loss weight of a QA answer's tokens (the copy the model must learn)


def train_tokenizer(seed: int) -> Tokenizer:
    """Byte-level BPE with single-digit tokens, trained on the corpus and generated text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(builtin.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    gen = CorpusGenerator(seed, TRAIN)
    texts = prose_split()[0] + [gen.qa().prompt for _ in range(2000)] + [gen.prose_paragraph() for _ in range(2000)]
    texts += [gen.numbers() for _ in range(300)]
    tok.train_from_iterator(texts, trainer)
    return tok


class Batches:
    """Rows of SEQ_LEN token ids packed with whole examples (each ending in <|endoftext|>).

    Yields (ids (B, SEQ_LEN) int64, weights (B, SEQ_LEN) float32): weights[t] is the loss weight
    of predicting ids[t + 1] (0 on padding).
    """

    def __init__(self, tok: Tokenizer, seed: int, batch_size: int, qa_share: float, no_space_share: float):
        self.tok, self.batch_size = tok, batch_size
        self.mix = (("qa", qa_share), ("prose", 0.75 * (1 - qa_share)), ("numbers", 0.25 * (1 - qa_share)))
        self.no_space_share = no_space_share
        self.few_docs = False
        self.gen = CorpusGenerator(seed, TRAIN)
        self.rng = random.Random(seed + 1)
        self.prose = prose_split()[0]
        self.eos = tok.token_to_id(builtin.EOS_TOKEN)
        self._pending: tuple[list[int], list[float]] | None = None

    def phase2(self, qa_share: float) -> None:
        """Mostly document QA; half of it with 2 to 4 documents (fewer distractors: an easier start)."""
        self.mix = (("qa", qa_share), ("prose", 0.75 * (1 - qa_share)), ("numbers", 0.25 * (1 - qa_share)))
        self.few_docs = True

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def example(self) -> tuple[list[int], list[float]]:
        """(ids, weights) of one example; weights[i] weighs predicting ids[i]."""
        r, kind = self.rng.random(), "qa"
        acc = 0.0
        for kind, share in self.mix:
            acc += share
            if r < acc:
                break
        if kind == "qa":
            few = self.few_docs and self.rng.random() < 0.5
            qa = self.gen.qa(self.rng.randint(2, 4) if few else None)
            ids, w = self._encode("\n".join(qa.documents) + "\n"), []
            w = [1.0] * len(ids)
            pairs = self.gen.quiz(qa, self.rng.randint(0, MAX_QUIZ)) + [(qa.question, qa.answer)]
            for question, value in pairs:
                # most prompts end "Answer:" (the answer carries its space), some "Answer: "
                space = self.rng.random() < 1 - self.no_space_share
                prompt = self._encode(question + "\nAnswer:" + ("" if space else " "))
                answer = self._encode((" " if space else "") + value + "\n")
                ids += prompt + answer
                w += [1.0] * len(prompt) + [ANSWER_WEIGHT] * len(answer)
            return ids + [self.eos], w + [ANSWER_WEIGHT]
        if kind == "prose":
            text = self.rng.choice(self.prose) if self.rng.random() < 0.5 else self.gen.prose_paragraph()
        else:
            text = self.gen.numbers()
        ids = self._encode(text)[: SEQ_LEN - 1] + [self.eos]
        return ids, [1.0] * len(ids)

    def row(self) -> tuple[list[int], list[float]]:
        ids, w = [self.eos], [0.0]  # a row starts with <|endoftext|> as context
        while True:
            ex = self._pending or self.example()
            self._pending = None
            if len(ids) + len(ex[0]) > SEQ_LEN:
                self._pending = ex if len(ex[0]) < SEQ_LEN else None
                break
            ids += ex[0]
            w += ex[1]
        pad = SEQ_LEN - len(ids)
        return ids + [self.eos] * pad, w + [0.0] * pad

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.row() for _ in range(self.batch_size)]
        ids = torch.tensor([r[0] for r in rows])
        w = torch.tensor([r[1] for r in rows])
        return ids, torch.cat([w[:, 1:], torch.zeros(len(rows), 1)], dim=1)


def make_model(config: dict):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "sdpa"
    return Qwen3MoeForCausalLM(cfg)


def hf_to_raymoe(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """transformers 5's fused expert tensors -> one tensor per expert, as builtin.weight_shapes names them."""
    out = {}
    inter = config["moe_intermediate_size"]
    for name, t in state.items():
        t = t.detach().to(torch.float32).contiguous()
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


def raymoe_to_hf(weights: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The inverse of hf_to_raymoe: per-expert tensors -> transformers 5's fused expert tensors."""
    out = {k: v for k, v in weights.items() if ".mlp.experts." not in k}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.experts"
        experts = range(config["num_experts"])
        out[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([weights[f"{p}.{e}.gate_proj.weight"], weights[f"{p}.{e}.up_proj.weight"]]) for e in experts]
        )
        out[f"{p}.down_proj"] = torch.stack([weights[f"{p}.{e}.down_proj.weight"] for e in experts])
    return out


@torch.no_grad()
def qa_exact_match(model, tok: Tokenizer, seed: int, n: int, split: str = HELDOUT) -> float:
    """Share of n document-QA prompts (2-8 docs) whose answer tokens are all the argmax (= greedy)."""
    gen = CorpusGenerator(seed, split)
    model.eval()
    hits = 0
    for _ in range(n):
        qa = gen.qa()
        prompt = tok.encode(qa.prompt, add_special_tokens=False).ids
        answer = tok.encode(" " + qa.answer + "\n", add_special_tokens=False).ids
        ids = torch.tensor([prompt + answer])
        logits = model(ids).logits[0, len(prompt) - 1 : -1]
        hits += int(logits.argmax(-1).tolist() == answer)
    model.train()
    return hits / n


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
    """Linear warm-up, then inverse square root: independent of the run's length, so the weights
    after N steps of a longer run equal those of a run with --steps N."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * math.sqrt(warmup / (step + 1))


def train(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(args.seed)
    eos = tok.token_to_id(builtin.EOS_TOKEN)
    config = builtin.model_config(tok.get_vocab_size(), bos_token_id=eos, eos_token_id=eos, architecture=ARCHITECTURE)
    model = make_model(config)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    batches = Batches(tok, args.seed, args.batch_size, args.qa_share, args.no_space_share)
    first = 0
    if args.resume:  # weights this script saved at the phase-2 step; replay the data up to there
        first = int(Path(args.resume).name.removeprefix("step"))
        if first != args.phase2_step:
            raise SystemExit(f"--resume must be the step{args.phase2_step} folder (the optimizer restarts there)")
        model.load_state_dict(raymoe_to_hf(load_file(str(Path(args.resume) / "model.safetensors")), config))
        for _ in range(first):
            next(batches)
    log = (out / "train_log.jsonl").open("a" if args.resume else "w")
    print(f"params {params / 1e6:.2f}M vocab {tok.get_vocab_size()}", flush=True)
    start = time.time()
    for step in range(first, args.steps):
        if step == args.phase2_step:
            opt = torch.optim.AdamW(model.parameters(), lr=args.phase2_lr, betas=(0.9, 0.95), weight_decay=0.05)
            batches.phase2(args.phase2_qa_share)
        ids, weights = next(batches)
        for group in opt.param_groups:
            if step < args.phase2_step:
                group["lr"] = lr_at(step, args.lr, args.warmup)
            else:
                group["lr"] = lr_at(step - args.phase2_step, args.phase2_lr, args.warmup)
        loss, aux = step_loss(model, ids, weights)
        total = loss + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        entry = {"step": step + 1, "loss": round(loss.item(), 4), "aux": round(aux.item(), 4),
                 "elapsed_s": round(time.time() - start, 1)}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            entry["qa_heldout_em"] = qa_exact_match(model, tok, args.seed + 7, args.eval_n)
        log.write(json.dumps(entry) + "\n")
        log.flush()
        if (step + 1) % 10 == 0 or "qa_heldout_em" in entry:
            print(json.dumps(entry), flush=True)
        if args.save_every and (step + 1) % args.save_every == 0:
            save(model, tok, config, out / f"step{step + 1}")
    save(model, tok, config, out)
    if args.plot:
        plot(out / "train_log.jsonl", Path(args.plot))


def save(model, tok: Tokenizer, config: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in builtin.SPECIAL_TOKENS}
    builtin._write_json(out / "config.json", config)
    builtin._write_json(out / "generation_config.json", builtin._generation_config(ids))
    builtin._write_json(out / "tokenizer_config.json", builtin._tokenizer_config())
    save_file(hf_to_raymoe(model.state_dict(), config), str(out / "model.safetensors"), metadata={"format": "pt"})


def plot(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.6, label="training loss (weighted CE)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.axvline(PHASE2_STEP, color="grey", ls=":", lw=1)  # phase 2: fresh optimizer, mostly document QA
    ev = [r for r in rows if "qa_heldout_em" in r]
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in ev], [r["qa_heldout_em"] for r in ev], "o-", color="C1", label="held-out QA exact match")
    ax2.set_ylabel("QA exact match")
    ax2.set_ylim(0, 1)
    fig.legend(loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=750)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--qa-share", type=float, default=QA_SHARE)
    p.add_argument("--no-space-share", type=float, default=NO_SPACE_SHARE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-n", type=int, default=40)
    p.add_argument("--save-every", type=int, default=0, help="also write the model every N steps (out/stepN)")
    p.add_argument("--phase2-step", type=int, default=PHASE2_STEP)
    p.add_argument("--phase2-lr", type=float, default=2e-3)
    p.add_argument("--phase2-qa-share", type=float, default=PHASE2_QA_SHARE)
    p.add_argument("--resume", default=None, help="the stepN folder of an earlier run with these settings, N = --phase2-step")
    p.add_argument("--plot", default=None, help="write the loss curve PNG here")
    train(p.parse_args())


if __name__ == "__main__":
    main()
