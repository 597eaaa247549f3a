"""Verification on its own: greedy walks the argmax path; the sampled rule keeps p's distribution."""

import pytest
import torch

from raymoe.engine.sampling_params import SamplingParams
from raymoe.engine.sequence import Sequence
from raymoe.engine.spec.draft import Draft
from raymoe.engine.spec.verify import accept_greedy, accept_sampled, verify

# root -> {A=1, B=2}; A -> {C=3}. Vocabulary of 5 tokens.
TREE = Draft((1, 2, 3), (0, 0, 1))
P = torch.tensor([
    [0.10, 0.30, 0.25, 0.20, 0.15],  # at the root: A 0.30, B 0.25
    [0.05, 0.05, 0.10, 0.50, 0.30],  # after A: C 0.50
    [0.40, 0.10, 0.10, 0.10, 0.30],  # after B (a leaf)
    [0.20, 0.20, 0.20, 0.20, 0.20],  # after A C (a leaf)
])  # fmt: skip


def test_greedy_follows_the_argmax_while_a_child_has_it():
    assert accept_greedy([1, 3, 0, 4], TREE) == [1, 3]  # A then C, bonus from C's row
    assert accept_greedy([2, 3, 0, 4], TREE) == [2]  # B, then B's row picks the bonus
    assert accept_greedy([4, 3, 0, 4], TREE) == []


def test_verify_greedy_returns_the_path_tokens_and_the_bonus():
    s = Sequence([7, 8], SamplingParams(temperature=0))
    logits = torch.log(P)
    assert verify(logits, s, TREE, (), None) == ([1, 3], [1, 3, 0])  # argmax: A, C, then row of C -> 0


def emitted_pairs(accept, n: int) -> torch.Tensor:
    """Counts [5, 6] of (first token, second token or 5 = none) over n seeded verifications."""
    counts = torch.zeros(5, 6)
    for i in range(n):
        path, bonus = accept(P, TREE, torch.Generator().manual_seed(i))
        tokens = [TREE.token(x) for x in path] + [bonus]
        counts[tokens[0], tokens[1] if len(tokens) > 1 else 5] += 1
    return counts


def expected_pairs() -> torch.Tensor:
    """What plain sampling emits as (first, second) where a step can yield a second token: a
    second token exists after a draft token was accepted (A or B at the root)."""
    exp = torch.zeros(5, 6)
    for first in range(5):
        exp[first, 5] = P[0, first]
    exp[1, :5], exp[1, 5] = P[0, 1] * P[1], 0.0  # after A, the next token is drawn from A's row
    exp[2, :5], exp[2, 5] = P[0, 2] * P[2], 0.0
    return exp


def within_bound(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Every cell within 5 standard deviations of its expected count (fails with odds ~1e-5 per run
    if the distribution is right; a shift of 0.02 in any cell fails it at this n)."""
    n = counts.sum()
    sd = (n * probs * (1 - probs)).sqrt().clamp(min=1.0)
    return bool(((counts - n * probs).abs() <= 5 * sd).all())


N = 6000


def test_sampled_acceptance_keeps_the_distribution():
    assert within_bound(emitted_pairs(accept_sampled, N), expected_pairs())


def always_take_a_child(probs, draft, generator):
    """A wrong rule (accept the first child always): the bound must catch it."""
    path = [draft.children(0)[0]]
    return path, int(probs[path[-1]].argmax())


@pytest.mark.parametrize("wrong", [always_take_a_child])
def test_the_bound_catches_a_wrong_rule(wrong):
    assert not within_bound(emitted_pairs(wrong, N), expected_pairs())
