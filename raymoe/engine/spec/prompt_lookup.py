"""Prompt lookup: draft the tokens that followed the last time the sequence's tail appeared.

The longest tail of `max_ngram` down to `min_ngram` tokens that occurred earlier in the prompt or
the output picks the draft: the tokens after its most recent earlier occurrence, as a chain. Text
that copies its context (answers quoting a document, code edits, repeated lists) is drafted right.

Each sequence keeps an index n-gram -> the end of its latest occurrence, extended as tokens come
(amortised O(max_ngram) per token, not a scan of the context per step).
"""

from __future__ import annotations

from raymoe.engine.spec.draft import Draft


class NgramIndex:
    """One sequence's n-grams: (tokens) -> index of the last token of their latest occurrence,
    for every occurrence that ends before the sequence's last token."""

    def __init__(self, min_ngram: int, max_ngram: int):
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.latest: dict[tuple[int, ...], int] = {}
        self.num_indexed = 0  # occurrences ending at positions < this are in `latest`

    def update(self, token_ids: list[int]) -> None:
        for end in range(self.num_indexed, len(token_ids) - 1):
            for n in range(self.min_ngram, min(self.max_ngram, end + 1) + 1):
                self.latest[tuple(token_ids[end - n + 1 : end + 1])] = end
        self.num_indexed = max(self.num_indexed, len(token_ids) - 1)

    def match(self, token_ids: list[int]) -> int | None:
        """End of the latest earlier occurrence of the longest tail that has one, or None."""
        for n in range(min(self.max_ngram, len(token_ids)), self.min_ngram - 1, -1):
            end = self.latest.get(tuple(token_ids[-n:]))
            if end is not None:
                return end
        return None


class PromptLookup:
    name = "prompt_lookup"
    default_num_tokens = 8

    def __init__(self, min_ngram: int = 1, max_ngram: int = 4):
        assert 1 <= min_ngram <= max_ngram
        self.min_ngram, self.max_ngram = min_ngram, max_ngram

    def propose(self, seq, max_nodes: int, max_depth: int) -> Draft | None:
        """seq: a `Sequence` (its `draft_state` holds the index). A chain of at most
        min(max_nodes, max_depth) tokens, or None when the tail occurred nowhere before."""
        if seq.draft_state is None:
            seq.draft_state = NgramIndex(self.min_ngram, self.max_ngram)
        index, tokens = seq.draft_state, seq.token_ids
        index.update(tokens)
        end = index.match(tokens)
        if end is None:
            return None
        follow = tokens[end + 1 : end + 1 + min(max_nodes, max_depth)]
        return Draft.chain(follow) if follow else None

    def observe(self, token_ids, logits) -> None:
        """Nothing to learn from the model's logits."""
