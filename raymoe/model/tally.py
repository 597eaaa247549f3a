"""RoutingTally: each request's routing choices summed over the steps a worker ran for it.

What a prefill worker hands over with a prompt (the prompt's routing, from which the router
predicts the request's experts), and what a decode worker reports per request (the controller's
request profiles for grouping). The router calls `add` per MoE layer as it routes; the model runner
brackets each forward with `begin_step` and `end_step`, which maps tokens back to requests.
"""

from __future__ import annotations

import numpy as np
import torch


class RoutingTally:
    """counts: request id -> `[moe layers, experts]` int64 token-expert pairs routed so far."""

    def __init__(self, num_layers: int, num_experts: int):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.counts: dict[str, np.ndarray] = {}
        self._step: dict[int, list[torch.Tensor]] = {}  # moe layer -> this step's ids [T_i, K] parts

    def add(self, moe_layer: int, ids: torch.Tensor) -> None:
        """ids: `[T_i, K]` a (micro)batch's choices at a layer, in token order."""
        self._step.setdefault(moe_layer, []).append(ids)

    def begin_step(self) -> None:
        self._step.clear()

    def end_step(self, request_ids: list[str], query_lens: list[int]) -> None:
        """Add this step's choices to the requests that ran it (`query_lens[b]` tokens each)."""
        step, self._step = self._step, {}
        if not step:
            return
        num_seqs, width = len(request_ids), self.num_layers * self.num_experts
        device = next(iter(step.values()))[0].device
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), torch.tensor(query_lens)).to(device)  # [T]
        cells = []
        for layer, parts in step.items():
            ids = torch.cat(parts)  # [T, K]
            cells.append(seq_of_token[:, None] * width + layer * self.num_experts + ids)
        counts = torch.bincount(torch.cat(cells).reshape(-1), minlength=num_seqs * width)
        counts = counts.view(num_seqs, self.num_layers, self.num_experts).cpu().numpy()  # one host copy
        for b, rid in enumerate(request_ids):
            have = self.counts.get(rid)
            self.counts[rid] = counts[b].copy() if have is None else have + counts[b]

    def pop(self, request_id: str) -> np.ndarray | None:
        return self.counts.pop(request_id, None)

    def keep_only(self, request_ids) -> None:
        """Forget requests not in `request_ids` (finished or aborted)."""
        live = set(request_ids)
        for rid in [r for r in self.counts if r not in live]:
            del self.counts[rid]
