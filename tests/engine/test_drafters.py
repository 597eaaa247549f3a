"""Drafters on their own: prompt lookup's n-gram match, Token Recycling's tree template and matrix."""

import torch

from raymoe.engine.sampling_params import SamplingParams
from raymoe.engine.sequence import Sequence
from raymoe.engine.spec.draft import Draft
from raymoe.engine.spec.prompt_lookup import PromptLookup
from raymoe.engine.spec.token_recycling import TokenRecycling, tree_template


def seq(tokens) -> Sequence:
    return Sequence(list(tokens), SamplingParams())


def test_prompt_lookup_takes_the_longest_tail_and_its_latest_occurrence():
    s = seq([5, 6, 7, 8, 1, 6, 9, 2, 6, 7])  # "6 7" occurred once before, "7" once, "6" twice
    draft = PromptLookup(1, 3).propose(s, max_nodes=4, max_depth=8)
    assert draft.tokens == (8, 1, 6, 9) and draft.parents == (0, 1, 2, 3)  # max_nodes caps the chain
    s.token_ids += [8]  # tail "7 8" (and "6 7 8") occurred once, at the start
    assert PromptLookup(1, 3).propose(s, 8, 2).tokens == (1, 6)  # max_depth caps it too
    assert PromptLookup(1, 3).propose(seq([1, 2, 3]), 8, 8) is None  # "3" never occurred before


def test_prompt_lookup_drafts_an_ambiguous_tail_as_far_as_its_latest_continuations_agree():
    # "1 2" twice before: then "3 8 ..." (latest) and "3 9 ...": they agree on "3" only
    assert PromptLookup(1, 3).propose(seq([1, 2, 3, 9, 1, 2, 3, 8, 5, 1, 2]), 8, 8).tokens == (3,)
    # "6 7" twice before, then 9 and 8: no draft (a common tail says little)
    assert PromptLookup(1, 3).propose(seq([5, 6, 7, 8, 1, 6, 7, 9, 2, 6, 7]), 8, 8) is None


def test_prompt_lookup_buffer_grows_with_the_sequence():
    drafter, s = PromptLookup(2, 2), seq([4, 5, 6])
    assert drafter.propose(s, 4, 4) is None
    s.token_ids += [4, 5]
    assert drafter.propose(s, 4, 4).tokens == (6, 4, 5)
    s.token_ids += [9, 4] * 200  # past the buffer's first size; tail "9 4" last seen 2 tokens back
    assert drafter.propose(s, 4, 4).tokens == (9, 4) and s.draft_state.n == len(s)
    assert drafter.propose(seq([4, 7, 4]), 4, 4) is None  # "7 4" never occurred before (min_ngram 2)


def test_tree_template_is_best_first_and_every_prefix_is_a_tree():
    nodes = tree_template(6, rank_accept=(0.5, 0.3))
    # values: 0.5 (r0), 0.3 (r1), 0.25 (r0 r0), 0.15 (r0 r1), 0.15 (r1 r0), 0.125 (r0 r0 r0)
    assert nodes == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (3, 0)]
    assert all(parent < i for i, (parent, _) in enumerate(nodes, start=1))


def test_token_recycling_lays_the_template_over_the_matrix():
    tr = TokenRecycling(vocab_size=10, num_nodes=5, top_k=2)
    tr.template = [(0, 0), (0, 1), (1, 0), (1, 1), (3, 0)]
    logits = torch.full((2, 10), -5.0)
    logits[0, 4], logits[0, 7] = 3.0, 2.0  # after token 3: 4, then 7
    logits[1, 8], logits[1, 2] = 3.0, 1.0  # after token 4: 8, then 2
    tr.observe(torch.tensor([3, 4]), logits)
    draft = tr.propose(seq([1, 3]), max_nodes=8, max_depth=8)
    # 3 -> {4 -> {8, 2}, 7}; template node 5 hangs under 8, which has no successors yet
    assert draft == Draft((4, 7, 8, 2), (0, 0, 1, 1))
    assert tr.propose(seq([1, 3]), max_nodes=8, max_depth=1) == Draft((4, 7), (0, 0))
    assert tr.propose(seq([1, 3]), max_nodes=1, max_depth=8) == Draft((4,), (0,))
    assert tr.propose(seq([1, 9]), 8, 8) is None


def test_draft_paths_and_depths():
    d = Draft((4, 7, 8, 2), (0, 0, 1, 1))
    assert d.children(0) == [1, 2] and d.children(1) == [3, 4] and d.children(2) == []
    assert d.path(4) == [1, 4] and d.path(0) == []
    assert d.depths() == [0, 1, 1, 2, 2]
    assert Draft.chain([5, 6]).tree_parents() == [-1, 0, 1]


def test_spec_stats_add_up_over_engines():
    from raymoe.engine.spec.speculator import SpecStats

    a = SpecStats(num_verify_steps=4, num_draft_tokens=10, num_accepted_tokens=4, num_emitted_tokens=8).as_dict()
    b = SpecStats(num_verify_steps=6, num_draft_tokens=30, num_accepted_tokens=6, num_emitted_tokens=12).as_dict()
    total = SpecStats.total([a, b]).as_dict()
    assert total["acceptance_rate"] == 10 / 40 and total["mean_accepted_tokens"] == 20 / 10
    assert SpecStats().as_dict()["acceptance_rate"] == 0.0


def test_drafts_are_as_deep_as_they_pay():
    """A sequence whose drafts are kept half the time drafts 3 deep (0.5^3 > DRAFT_COST = 0.1 > 0.5^4)."""
    from raymoe.engine.spec.speculator import worth_depth

    assert worth_depth((1.0, 1.0)) == 3
    assert worth_depth((9.0, 1.0)) == 21 and worth_depth((0.0, 5.0)) == 1


def test_token_recycling_measures_its_ranks_and_rebuilds_its_tree(monkeypatch):
    """A model whose argmax is always the runner-up of the last row for its input token: rank 1
    comes to lead the template."""
    from raymoe.engine.spec import token_recycling as tr_module

    monkeypatch.setattr(tr_module, "REBUILD_ROWS", 64)
    tr = TokenRecycling(vocab_size=4, num_nodes=6, top_k=2)
    assert tr.template[0] == (0, 0)
    one_then_two, two_then_one = torch.tensor([[0.0, 3.0, 2.0, 0.0]]), torch.tensor([[0.0, 2.0, 3.0, 0.0]])
    for i in range(301):
        tr.observe(torch.tensor([0]), one_then_two if i % 2 == 0 else two_then_one)
    assert tr.rank_accept()[1] > 0.6 and tr.template[0] == (0, 1)
