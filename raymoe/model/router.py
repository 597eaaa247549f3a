"""Routers: which experts each token goes to, and with what weight.

Both return `(topk_ids [T, K] long, topk_weights [T, K] float32-or-model-dtype)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_topk(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen / OLMoE: softmax over experts (float32), keep the top k, optionally renormalise.

    logits: [T, E] -> ids [T, K], weights [T, K] in the logits' dtype.
    """
    probs = F.softmax(logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights.to(logits.dtype)


def sigmoid_grouped_topk(
    logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    normalize: bool,
    scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: sigmoid scores; the bias steers the choice only; experts restricted to the
    `topk_group` groups whose top-2 biased scores sum highest.

    logits: [T, E] float32, correction_bias: [E] -> ids [T, K], weights [T, K] float32.
    """
    num_tokens, num_experts = logits.shape
    scores = logits.sigmoid()
    choice = scores + correction_bias
    group_scores = choice.view(num_tokens, n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    expert_mask = group_mask.unsqueeze(-1).expand(-1, n_group, num_experts // n_group).reshape(num_tokens, -1)
    choice = choice.masked_fill(~expert_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * scaling_factor
