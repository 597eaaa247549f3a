"""Speculator: the engine's side of speculative decoding. Which drafter, how many draft tokens a
sequence gets this step, and counts of how well the drafts did.

A step verifies every running decode's draft in the same forward as its ordinary decode token, so
drafts are nearly free while a step's cost does not grow with its token count (decoding is bound by
reading the weights, not by arithmetic). Past `token_budget` tokens a step is compute-bound and each
draft token costs about what it may save; so the per-sequence draft size shrinks as the batch grows
(`budget // decodes - 1`), down to none.

A draft never makes a sequence overshoot: at most `max_tokens - generated - 1` deep (the bonus token
comes on top), and it fits the model's context. Stop strings and EOS inside an accepted draft end
the sequence there; the tokens after them are dropped (`LLMEngine._check_stop`).
"""

from __future__ import annotations

from dataclasses import dataclass

from raymoe.engine.spec.draft import Draft


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
    def __init__(self, drafter, num_tokens: int, token_budget: int, max_model_len: int):
        """drafter: has `propose(seq, max_nodes, max_depth) -> Draft | None` and `observe(token_ids
        [R], logits [R, V])`. num_tokens: draft tokens per sequence at most."""
        self.drafter, self.num_tokens, self.token_budget = drafter, num_tokens, token_budget
        self.max_model_len = max_model_len
        self.stats = SpecStats()

    def draft_size(self, num_decodes: int, step_budget: int) -> int:
        """Draft tokens each of `num_decodes` sequences may get, when the step holds `step_budget`
        new tokens at most."""
        if num_decodes == 0:
            return 0
        budget = min(self.token_budget, step_budget)
        return max(0, min(self.num_tokens, budget // num_decodes - 1))

    def propose(self, seq, size: int) -> Draft | None:
        """A draft of at most `size` tokens for a decoding sequence, or None."""
        max_depth = seq.params.max_tokens - seq.num_output_tokens - 1
        max_nodes = min(size, self.max_model_len - len(seq) - 1)
        if max_depth < 1 or max_nodes < 1:
            return None
        return self.drafter.propose(seq, max_nodes, max_depth)

    def observe(self, token_ids, logits) -> None:
        """token_ids: [R] input token of each row of logits [R, V] computed this step."""
        self.drafter.observe(token_ids, logits)

    def record(self, draft: Draft, num_accepted: int) -> None:
        s = self.stats
        s.num_verify_steps += 1
        s.num_draft_tokens += draft.size
        s.num_accepted_tokens += num_accepted
        s.num_emitted_tokens += num_accepted + 1
