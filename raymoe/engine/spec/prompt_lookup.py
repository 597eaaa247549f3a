"""Prompt lookup: draft the tokens that followed the last time the sequence's tail appeared.

The longest tail of `max_ngram` down to `min_ngram` tokens that occurred earlier in the prompt or
the output picks the draft: the tokens after its most recent earlier occurrence, as a chain. Text
that copies its context (answers quoting a document, code edits, repeated lists) is drafted right.

Each sequence keeps its tokens in a numpy buffer, extended as tokens come; a step's match is a few
vectorised comparisons over it (the positions of the last token, narrowed one token back at a
time), microseconds for thousands of tokens, with no index to build on a long prompt's first step.
"""

from __future__ import annotations

import numpy as np

from raymoe.engine.spec.draft import Draft


class TokenBuffer:
    """One sequence's token ids as a growing int array (`tokens` [n])."""

    def __init__(self):
        self.data, self.n = np.zeros(256, dtype=np.int64), 0

    def sync(self, token_ids: list[int]) -> np.ndarray:
        """The buffer holding exactly token_ids (appends the new ones; rebuilt if they shrank)."""
        if len(token_ids) < self.n:
            self.n = 0
        if len(token_ids) > self.data.shape[0]:
            grown = np.zeros(max(2 * self.data.shape[0], len(token_ids)), dtype=np.int64)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n : len(token_ids)] = token_ids[self.n :]
        self.n = len(token_ids)
        return self.data[: self.n]


def latest_match(tokens: np.ndarray, min_ngram: int, max_ngram: int) -> int | None:
    """tokens [L] -> end index (< L - 1) of the latest earlier occurrence of the longest tail of
    min_ngram..max_ngram tokens that has one, or None."""
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])  # occurrences of the 1-token tail
    best, length = (int(ends[-1]) if ends.size else None), 1
    for k in range(1, min(max_ngram, len(tokens) - 1)):
        ends = ends[ends >= k]
        ends = ends[tokens[ends - k] == tokens[-1 - k]]
        if not ends.size:
            break
        best, length = int(ends[-1]), k + 1
    return best if best is not None and length >= min_ngram else None


class PromptLookup:
    name = "prompt_lookup"
    default_num_tokens = 8

    def __init__(self, min_ngram: int = 1, max_ngram: int = 4):
        assert 1 <= min_ngram <= max_ngram
        self.min_ngram, self.max_ngram = min_ngram, max_ngram

    def propose(self, seq, max_nodes: int, max_depth: int) -> Draft | None:
        """seq: a `Sequence` (its `draft_state` holds its token buffer). A chain of at most
        min(max_nodes, max_depth) tokens, or None when the tail occurred nowhere before."""
        if seq.draft_state is None:
            seq.draft_state = TokenBuffer()
        tokens = seq.draft_state.sync(seq.token_ids)
        end = latest_match(tokens, self.min_ngram, self.max_ngram)
        if end is None:
            return None
        follow = tokens[end + 1 : end + 1 + min(max_nodes, max_depth)].tolist()
        return Draft.chain(follow) if follow else None

    def observe(self, token_ids, logits) -> None:
        """Nothing to learn from the model's logits."""
