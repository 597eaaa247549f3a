"""Drafters by name, checked against the names a config may use, and the Speculator they go in."""

from __future__ import annotations

from raymoe.engine.spec.names import SPECULATIVE_NAMES
from raymoe.engine.spec.prompt_lookup import PromptLookup
from raymoe.engine.spec.speculator import DRAFT_COST, Speculator
from raymoe.engine.spec.token_recycling import TokenRecycling

DRAFTERS = {"token_recycling": TokenRecycling, "prompt_lookup": PromptLookup}
assert set(DRAFTERS) == set(SPECULATIVE_NAMES) - {"none"}, "every speculative name has its drafter"


def default_num_tokens(name: str) -> int:
    """Draft tokens per sequence when the config leaves it out (measured, docs/benchmarks.md)."""
    return DRAFTERS[name].default_num_tokens if name in DRAFTERS else 0


def make_speculator(name: str, num_tokens: int | None, token_budget: int, vocab_size: int,
                    max_model_len: int, draft_cost: float = DRAFT_COST) -> Speculator | None:  # fmt: skip
    """None for "none"; the names are checked by the config (EngineConfig)."""
    if name == "none":
        return None
    num_tokens = num_tokens or default_num_tokens(name)
    if name == "token_recycling":
        drafter = TokenRecycling(vocab_size, num_tokens, min_value=draft_cost)
    else:
        drafter = PromptLookup()
    return Speculator(drafter, num_tokens, token_budget, max_model_len, draft_cost)
