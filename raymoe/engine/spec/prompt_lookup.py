"""Prompt lookup: draft the tokens that followed the last time the sequence's tail appeared.

The longest tail of `max_ngram` down to `min_ngram` tokens that occurred earlier in the prompt or
the output picks the draft: the tokens after its most recent earlier occurrence, as a chain. Text
that copies its context (answers quoting a document, code edits, repeated lists) is drafted right.
A tail that occurred several times drafts only as far as its two latest continuations agree, so
nothing when they differ at once: a common token (a newline, "the") says little about what comes
next, and a rejected draft still costs its verification (docs/benchmarks.md: document QA at batch
1, 1.34x -> 1.62x; prose unchanged).

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


def longest_matches(tokens: np.ndarray, min_ngram: int, max_ngram: int) -> np.ndarray:
    """tokens [L] -> end indices (< L - 1, ascending) of every earlier occurrence of the longest tail
    of min_ngram..max_ngram tokens that has one (empty: none)."""
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])  # occurrences of the 1-token tail
    best, length = ends, 1
    for k in range(1, min(max_ngram, len(tokens) - 1)):
        ends = ends[ends >= k]
        ends = ends[tokens[ends - k] == tokens[-1 - k]]
        if not ends.size:
            break
        best, length = ends, k + 1
    return best if length >= min_ngram else best[:0]


def agreement(tokens: np.ndarray, a: int, b: int, limit: int) -> int:
    """How many of the (at most limit) tokens after positions a and b agree, from the first on."""
    n = min(limit, len(tokens) - 1 - a, len(tokens) - 1 - b)
    same = tokens[a + 1 : a + 1 + n] == tokens[b + 1 : b + 1 + n]
    return int(n if same.all() else same.argmin())


class PromptLookup:
    name = "prompt_lookup"
    default_num_tokens = 8

    def __init__(self, min_ngram: int = 1, max_ngram: int = 4):
        assert 1 <= min_ngram <= max_ngram
        self.min_ngram, self.max_ngram = min_ngram, max_ngram

    def propose(self, seq, max_nodes: int, max_depth: int) -> Draft | None:
        """seq: a `Sequence` (its `draft_state` holds its token buffer). A chain of at most
        min(max_nodes, max_depth) tokens, or None when the tail occurred nowhere before (or its
        latest occurrences disagree on the next token)."""
        if seq.draft_state is None:
            seq.draft_state = TokenBuffer()
        tokens = seq.draft_state.sync(seq.token_ids)
        ends = longest_matches(tokens, self.min_ngram, self.max_ngram)
        if not ends.size:
            return None
        depth, end = min(max_nodes, max_depth), int(ends[-1])
        if ends.size > 1:  # an ambiguous tail: as deep as its latest two continuations agree
            depth = agreement(tokens, end, int(ends[-2]), depth)
        follow = tokens[end + 1 : end + 1 + depth].tolist()
        return Draft.chain(follow) if follow else None

    def observe(self, token_ids, logits) -> None:
        """Nothing to learn from the model's logits."""
