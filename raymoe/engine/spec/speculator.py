"""Speculator: the engine's side of speculative decoding. Which drafter, how many draft tokens a
sequence gets this step, and counts of how well the drafts did.

A step verifies every running decode's draft in the same forward as its ordinary decode token. That
pays while a step's cost grows slowly with its token count: on a GPU while decoding is bound by
reading the weights; on the CPU here while per-op overheads dominate (bench/speculative.py
step_cost: 16 tokens cost 1.7-2x one, past ~64 the cost grows in proportion), and in the cluster
while the expert round trip per layer does. Past `token_budget` tokens a step a draft token costs
about what it may save, so the per-sequence draft size shrinks as the batch grows
(`token_budget // decodes - 1`), down to none.

A draft is only as deep as it is likely to pay: if a sequence's draft tokens are each accepted with
probability a (estimated from its recent steps, starting from how recent sequences did), the k-th costs `draft_cost` of a step and is kept
with probability a^k, so drafts stop at depth log(draft_cost) / log(a).

A draft never makes a sequence overshoot: at most `max_tokens - generated - 1` deep (the bonus token
comes on top), and it fits the model's context. Stop strings and EOS inside an accepted draft end
the sequence there; the tokens after them are dropped (`LLMEngine._check_stop`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from raymoe.engine.spec.draft import Draft

# A draft token's share of a decode step's time, by default (`EngineConfig.speculative_draft_cost`):
# bench/speculative.py step_cost on the built-in model, one CPU thread: the first draft tokens of a
# sequence add 10-30% each to a step at batch 1 to 64.
DRAFT_COST = 0.1
DECAY = 0.8  # weight of a sequence's earlier steps in its acceptance estimate
PRIOR_DECAY = 0.99  # the same over every sequence's steps: a new sequence's starting estimate
PRIOR_WEIGHT = 2.0  # how many tokens' worth of evidence a new sequence starts from


@dataclass
class SpecStats:
    num_verify_steps: int = 0  # sequence-steps that verified a draft
    num_draft_tokens: int = 0  # draft tokens verified
    num_accepted_tokens: int = 0  # of those, kept
    num_emitted_tokens: int = 0  # tokens those steps yielded: the accepted ones plus one each

    @classmethod
    def total(cls, reports: list[dict]) -> "SpecStats":
        """The sum of several engines' counters (`as_dict` outputs, e.g. every decode worker's)."""
        names = list(vars(cls()))
        return cls(**{n: sum(int(r.get(n, 0)) for r in reports) for n in names})

    def as_dict(self) -> dict[str, float]:
        """The counters, the acceptance rate (accepted / drafted: a tree drafts several tokens per
        position, so it stays well below 1 even when most steps keep a long path) and the mean
        accepted length (tokens per sequence-step, bonus included: 1 = no gain)."""
        d = dict(vars(self))
        d["acceptance_rate"] = self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0
        d["mean_accepted_tokens"] = self.num_emitted_tokens / self.num_verify_steps if self.num_verify_steps else 0.0
        return d


class Speculator:
    def __init__(self, drafter, num_tokens: int, token_budget: int, max_model_len: int,
                 draft_cost: float = DRAFT_COST):  # fmt: skip
        """drafter: has `propose(seq, max_nodes, max_depth) -> Draft | None` and `observe(token_ids
        [R], logits [R, V])`. num_tokens: draft tokens per sequence at most."""
        self.drafter, self.num_tokens, self.token_budget = drafter, num_tokens, token_budget
        self.draft_cost = draft_cost
        self.max_model_len = max_model_len
        self.stats = SpecStats()
        self.overall = (1.0, 1.0)  # (accepted, rejected) over every sequence's steps, decayed

    def prior(self) -> tuple[float, float]:
        """A new sequence's (accepted, rejected): how the drafts of recent sequences did, with the
        weight of PRIOR_WEIGHT tokens (a short answer gets deep drafts at once where drafts pay)."""
        accepted, rejected = self.overall
        scale = PRIOR_WEIGHT / (accepted + rejected)
        return accepted * scale, rejected * scale

    def draft_size(self, num_decodes: int, step_budget: int) -> int:
        """Draft tokens each of `num_decodes` sequences may get, when the step holds `step_budget`
        new tokens at most."""
        if num_decodes == 0:
            return 0
        budget = min(self.token_budget, step_budget)
        return max(0, min(self.num_tokens, budget // num_decodes - 1))

    def propose(self, seq, size: int) -> Draft | None:
        """A draft of at most `size` tokens for a decoding sequence, or None."""
        worth = worth_depth(seq.draft_record or self.prior(), self.draft_cost)
        max_depth = min(seq.params.max_tokens - seq.num_output_tokens - 1, worth)
        max_nodes = min(size, self.max_model_len - len(seq) - 1)
        if max_depth < 1 or max_nodes < 1:
            return None
        return self.drafter.propose(seq, max_nodes, max_depth)

    def observe(self, token_ids, logits) -> None:
        """token_ids: [R] input token of each row of logits [R, V] computed this step."""
        self.drafter.observe(token_ids, logits)

    def record(self, seq, draft: Draft, path: list[int]) -> None:
        """After verifying seq's draft: path = the accepted nodes. A path that ends at a node with
        children counts as a rejection (one ending at a leaf was not tested further)."""
        accepted, rejected = seq.draft_record or self.prior()
        was_rejected = bool(draft.children(path[-1] if path else 0))
        seq.draft_record = (DECAY * accepted + len(path), DECAY * rejected + was_rejected)
        accepted, rejected = self.overall
        self.overall = (PRIOR_DECAY * accepted + len(path), PRIOR_DECAY * rejected + was_rejected)
        num_accepted = len(path)
        s = self.stats
        s.num_verify_steps += 1
        s.num_draft_tokens += draft.size
        s.num_accepted_tokens += num_accepted
        s.num_emitted_tokens += num_accepted + 1


def worth_depth(record: tuple[float, float], cost: float = DRAFT_COST) -> int:
    """The deepest draft token whose chance of being kept, a^k, still beats its cost (at least 1)."""
    accepted, rejected = record
    rate = accepted / (accepted + rejected)
    if rate >= 1 - 1e-9:
        return 1 << 30
    return max(1, int(math.log(cost) / math.log(rate))) if rate > 0 else 1
