"""Logit adjustments a request asks for, applied to its row of logits before sampling.

In vLLM's order: logit_bias (added), min_tokens (EOS and stop_token_ids barred while fewer tokens
were generated), then the penalties: repetition (HF/vLLM style: a positive logit of a token seen in
the prompt or output is divided by the penalty, a negative one multiplied), frequency and presence
(OpenAI's: `logit -= frequency * count + presence * (count > 0)` over the generated tokens).
Temperature, min_p, top-k and top-p follow in the sampler. Rows that ask for none keep their
logits bit for bit (greedy outputs stay exact).
"""

from __future__ import annotations

import torch

from raymoe.engine.sampling_params import SamplingParams


def adjust_logits(logits: torch.Tensor, seqs: list, eos_token_ids: tuple[int, ...]) -> torch.Tensor:
    """logits: [B, V] (row b for seqs[b], a `Sequence`) -> adjusted logits [B, V] (a copy if any row changes)."""
    rows = [b for b, s in enumerate(seqs) if s.params.adjusts_logits]
    if not rows:
        return logits
    logits = logits.clone()
    for b in rows:
        s = seqs[b]
        logits[b] = adjust_row(logits[b], s.params, s.prompt_token_ids, s.output_token_ids, eos_token_ids)
    return logits


def adjust_row(row: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int],
               eos_token_ids: tuple[int, ...]) -> torch.Tensor:  # fmt: skip
    """row: [V] logits of one sequence -> adjusted [V] (in place)."""
    vocab_size, dev = row.shape[0], row.device  # index tensors are built on the host, moved once each
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias if t < vocab_size], dtype=torch.long).to(dev)
        row[ids] += torch.tensor([b for t, b in p.logit_bias if t < vocab_size], dtype=row.dtype).to(dev)
    if len(output_ids) < p.min_tokens:
        barred = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
        row[torch.tensor([t for t in barred if t < vocab_size], dtype=torch.long).to(dev)] = float("-inf")
    if p.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long).to(dev)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and output_ids:
        ids = torch.tensor(output_ids, dtype=torch.long).to(dev)
        counts = torch.bincount(ids, minlength=vocab_size)[:vocab_size]
        row -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty * (counts > 0).to(row.dtype)
    return row
