"""The built-in model's training text: document QA in the issue-12 format, and held-out names and
values that the training split never produces."""

import re

from raymoe.model.docqa import ATTRIBUTES, CONTRACT_ATTRIBUTES, HELDOUT, TRAIN, CorpusGenerator, prose_split

FACT = re.compile(r"The (\w+) of (\w+) is ([^.]+)\.")


def test_qa_prompt_follows_the_contract():
    gen = CorpusGenerator(3, TRAIN)
    for _ in range(50):
        qa = gen.qa()
        lines = qa.prompt.split("\n")
        assert 2 <= qa.num_docs == len(lines) - 2 <= 8
        assert lines[-1] == "Answer:"
        attribute, name = re.fullmatch(r"Question: What is the (\w+) of (\w+)\?", lines[-2]).groups()
        facts = [FACT.findall(doc) for doc in lines[:-2]]
        assert all(2 <= len(f) <= 6 for f in facts)
        holders = [i for i, f in enumerate(facts) if any(n == name for _, n, _ in f)]
        assert len(holders) == 1  # the asked person appears in exactly one document
        assert (attribute, name, qa.answer) in facts[holders[0]]
        if attribute == "code":
            assert re.fullmatch(r"\d{4}", qa.answer)
    assert set(CONTRACT_ATTRIBUTES) <= set(ATTRIBUTES)


def test_heldout_names_and_values_are_never_generated_for_training():
    train, heldout = CorpusGenerator(0, TRAIN), CorpusGenerator(0, HELDOUT)
    train_names = {train.name() for _ in range(20000)}
    train_values = {(a, train.value(a)) for _ in range(3000) for a in ATTRIBUTES}
    assert not train_names & {heldout.name() for _ in range(2000)}
    assert not train_values & {(a, heldout.value(a)) for _ in range(300) for a in ATTRIBUTES}


def test_seeded_and_prose_split_is_disjoint():
    assert CorpusGenerator(5).qa() == CorpusGenerator(5).qa()
    train, heldout = prose_split()
    assert train and heldout and not set(train) & set(heldout)
