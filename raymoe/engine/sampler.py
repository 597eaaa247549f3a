"""Sampler: next token ids from a batch of logits, each row with its own SamplingParams.

Greedy rows (temperature 0, or top_k 1) take the argmax. The others divide by the temperature,
drop the tokens below min_p times the most likely one, keep the top-k / top-p tokens, and draw with the exponential race (`argmax(p / q)`, `q ~ Exp(1)`,
as vLLM does), which samples from `p` exactly. Each seeded request draws its `q` from its own
`torch.Generator`, seeded once with its seed and advanced by every token it samples, so its output
does not depend on which other requests share its batch.
"""

from __future__ import annotations

import torch

from raymoe.engine.sampling_params import SamplingParams
from raymoe.model.host import inference


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@inference
def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """logits: [B, V] float32 -> next ids [B] (long). generators[b]: None = the global RNG."""
    assert logits.shape[0] == len(params) == len(generators)
    next_ids = argmax_rows(logits)  # [B]
    rows = [b for b, p in enumerate(params) if not p.is_greedy]
    if rows:
        probs = filtered_probs(logits[torch.tensor(rows).to(logits.device)].float(), [params[b] for b in rows])  # [R, V]
        # drawn on the host (the same seeded tokens on every device), moved once
        q = torch.stack([exponential(probs.shape[1], generators[b]) for b in rows]).to(probs.device)  # [R, V]
        next_ids[torch.tensor(rows).to(next_ids.device)] = (probs / q).argmax(dim=-1)
    return next_ids


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B] each row's first maximal index, as `argmax(dim=-1)` gives (NaN counting as the
    maximum too). On the host numpy's argmax finds it (same rule) with less overhead a call than
    torch's `max` or `argmax`."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2:
        return torch.from_numpy(logits.numpy().argmax(axis=1))
    return logits.max(dim=-1).indices


def exponential(vocab_size: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.empty(vocab_size).exponential_(generator=generator)  # [V]


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits: [R, V] -> probabilities [R, V] after temperature, min_p, top-k and top-p."""
    temperature = torch.tensor([p.temperature for p in params]).to(logits.device)[:, None]  # [R, 1]
    logits = logits / temperature
    min_p = torch.tensor([p.min_p for p in params]).to(logits.device)[:, None]  # [R, 1]
    if (min_p > 0).any():
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    top_k = [p.top_k if p.top_k > 0 else logits.shape[1] for p in params]
    top_p = [p.top_p for p in params]
    if min(top_k) < logits.shape[1] or min(top_p) < 1:
        logits = _top_k_top_p(logits, torch.tensor(top_k).to(logits.device), torch.tensor(top_p).to(logits.device))
    return logits.softmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits: [R, V]; top_k: [R] (V = off); top_p: [R] (1 = off) -> logits with dropped tokens -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [R, V]
    rank = torch.arange(logits.shape[1], device=logits.device)[None, :]  # [1, V]
    drop = rank >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
    drop |= ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
