"""Train raymoe's built-in model from scratch and write it as a Hugging Face folder.

    nice -n 5 python tools/train_builtin.py --out /tmp/builtin [--threads 2]

Deterministic: the tokenizer, the text (raymoe/model/docqa.py) and the weights all come from
fixed seeds, and the defaults reproduce the shipped model (raymoe/model/builtin_weights/). Writes
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
VOCAB_SIZE = 2048
SEQ_LEN = 768
MIX = (("qa", 0.6), ("prose", 0.3), ("numbers", 0.1))
MAX_QUIZ = 4  # extra training questions per QA example (more copy supervision per context token)
ANSWER_WEIGHT = 3.0  # loss weight of a QA answer's tokens (the copy the model must learn)


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

    def __init__(self, tok: Tokenizer, seed: int, batch_size: int):
        self.tok, self.batch_size = tok, batch_size
        self.gen = CorpusGenerator(seed, TRAIN)
        self.rng = random.Random(seed + 1)
        self.prose = prose_split()[0]
        self.eos = tok.token_to_id(builtin.EOS_TOKEN)
        self._pending: tuple[list[int], list[float]] | None = None

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def example(self) -> tuple[list[int], list[float]]:
        """(ids, weights) of one example; weights[i] weighs predicting ids[i]."""
        r, kind = self.rng.random(), "qa"
        acc = 0.0
        for kind, share in MIX:
            acc += share
            if r < acc:
                break
        if kind == "qa":
            qa = self.gen.qa()
            ids, w = self._encode("\n".join(qa.documents) + "\n"), []
            w = [1.0] * len(ids)
            pairs = self.gen.quiz(qa, self.rng.randint(0, MAX_QUIZ)) + [(qa.question, qa.answer)]
            for question, value in pairs:
                # half the prompts end 'Answer:' (the answer carries its space), half 'Answer: '
                space = self.rng.random() < 0.5
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
    batches = Batches(tok, args.seed, args.batch_size)
    log = (out / "train_log.jsonl").open("w")
    print(f"params {params / 1e6:.2f}M vocab {tok.get_vocab_size()}", flush=True)
    start = time.time()
    for step in range(args.steps):
        ids, weights = next(batches)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lr, args.warmup)
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
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-n", type=int, default=40)
    p.add_argument("--save-every", type=int, default=0, help="also write the model every N steps (out/stepN)")
    p.add_argument("--plot", default=None, help="write the loss curve PNG here")
    train(p.parse_args())


if __name__ == "__main__":
    main()
