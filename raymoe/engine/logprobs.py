"""Logprobs as the OpenAI API reports them: `log_softmax` of the model's raw logits (before any
penalty, bias or temperature, as vLLM's default), for the chosen token and the top-N.

An entry is `(logprob, [(token id, logprob), ...top-N, most likely first])`: plain numbers, so it
crosses actor boundaries and pickles cheaply.
"""

from __future__ import annotations

import torch

Entry = tuple[float, list[tuple[int, float]]]


def entries(logits: torch.Tensor, token_ids: list[int], num_top: int) -> list[Entry]:
    """logits: [N, V] raw; token_ids: [N] the tokens to score -> one entry per row."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    index = torch.tensor(token_ids, dtype=torch.long).to(logprobs.device)[:, None]  # [N, 1]
    chosen = logprobs.gather(1, index)[:, 0].tolist()  # [N]
    if num_top == 0:
        return [(c, []) for c in chosen]
    top = logprobs.topk(num_top, dim=-1)  # values, indices: [N, num_top]
    return [(c, list(zip(ids, vals))) for c, ids, vals in zip(chosen, top.indices.tolist(), top.values.tolist())]
