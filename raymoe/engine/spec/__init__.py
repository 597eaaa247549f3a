"""Speculative decoding without a second model: drafters guess tokens from the request itself and
the engine verifies every running sequence's guesses in its ordinary decode step.

- `draft.Draft`: a tree of draft tokens rooted at a sequence's last token.
- Drafters, one a file: `prompt_lookup` (n-gram match in the context), `token_recycling`
  (top-k candidates of earlier steps in an adjacency matrix, laid out as a static tree).
- `verify`: greedy acceptance (exactly plain decoding's tokens) and the rejection rule for sampling.
- `speculator.Speculator`: draft sizes per step (shrinking with the batch) and acceptance counts.
"""

from __future__ import annotations

from typing import Literal, get_args

from raymoe.engine.spec.prompt_lookup import PromptLookup
from raymoe.engine.spec.speculator import Speculator
from raymoe.engine.spec.token_recycling import TokenRecycling

SpeculativeName = Literal["none", "token_recycling", "prompt_lookup"]
SPECULATIVE_NAMES: tuple[str, ...] = get_args(SpeculativeName)
DRAFTERS = {"token_recycling": TokenRecycling, "prompt_lookup": PromptLookup}
assert set(DRAFTERS) == set(SPECULATIVE_NAMES) - {"none"}, "every speculative name has its drafter"


def default_num_tokens(name: str) -> int:
    """Draft tokens per sequence when the config leaves it out (measured, docs/benchmarks.md)."""
    return DRAFTERS[name].default_num_tokens if name in DRAFTERS else 0


def make_speculator(name: str, num_tokens: int | None, token_budget: int, vocab_size: int,
                    max_model_len: int) -> Speculator | None:  # fmt: skip
    """None for "none"; the names are checked by the config (EngineConfig)."""
    if name == "none":
        return None
    num_tokens = num_tokens or default_num_tokens(name)
    drafter = TokenRecycling(vocab_size, num_tokens) if name == "token_recycling" else PromptLookup()
    return Speculator(drafter, num_tokens, token_budget, max_model_len)


def check_speculative(name) -> str:
    """The name if it is a speculative method raymoe knows, else a ConfigError saying which are."""
    from raymoe.errors import ConfigError

    if name not in SPECULATIVE_NAMES:
        raise ConfigError(f"speculative must be one of {list(SPECULATIVE_NAMES)}, got {name!r}")
    return name
