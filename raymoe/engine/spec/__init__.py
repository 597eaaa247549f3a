"""Speculative decoding without a second model: drafters guess tokens from the request itself and
the engine verifies every running sequence's guesses in its ordinary decode step.

- `draft.Draft`: a tree of draft tokens rooted at a sequence's last token.
- Drafters, one a file: `prompt_lookup` (n-gram match in the context), `token_recycling`
  (top-k candidates of earlier steps in an adjacency matrix, laid out as a static tree).
- `verify`: greedy acceptance (exactly plain decoding's tokens) and the rejection rule for sampling.
- `speculator.Speculator`: draft sizes per step (shrinking with the batch) and acceptance counts.
- `names`: the names a config may use; `registry`: the drafter of each name.
"""

from raymoe.engine.spec.names import SPECULATIVE_NAMES, SpeculativeName, check_speculative

__all__ = ["SPECULATIVE_NAMES", "SpeculativeName", "check_speculative"]
