"""The built-in model's training text: document QA in the issue-12 format, and held-out names and
values that the training split never produces."""

import re

from raymoe.model.docqa import ATTRIBUTES, CONTRACT_ATTRIBUTES, HELDOUT, TRAIN, CorpusGenerator, prose_split

FACT = re.compile(r"The (\w+) of ([A-Z]\w*(?: [A-Z]\w*)?) is ([^.]+)\.")


def check_contract(gen: CorpusGenerator) -> None:
    for _ in range(50):
        qa = gen.qa()
        lines = qa.prompt.split("\n")
        assert 2 <= qa.num_docs == len(lines) - 2 <= 8
        assert lines[-1] == "Answer:"
        attribute, name = re.fullmatch(r"Question: What is the (\w+) of ([\w ]+)\?", lines[-2]).groups()
        facts = [FACT.findall(doc) for doc in lines[:-2]]
        assert all(2 <= len(f) <= 6 for f in facts)
        holders = [i for i, f in enumerate(facts) if any(n == name for _, n, _ in f)]
        assert len(holders) == 1  # the asked person appears in exactly one document
        assert (attribute, name, qa.answer) in facts[holders[0]]
        if attribute == "code":
            assert re.fullmatch(r"\d{4}", qa.answer)


def test_qa_prompt_follows_the_contract():
    check_contract(CorpusGenerator(3, TRAIN))
    check_contract(CorpusGenerator(3, TRAIN, pieces=("ab", "cod", "x")))
    check_contract(CorpusGenerator(3, HELDOUT))
    assert set(CONTRACT_ATTRIBUTES) <= set(ATTRIBUTES)


def test_heldout_names_and_values_are_never_generated_for_training():
    train, heldout = CorpusGenerator(0, TRAIN), CorpusGenerator(0, HELDOUT)
    train_names = {train.name() for _ in range(20000)}
    train_values = {(a, train.value(a)) for _ in range(3000) for a in ATTRIBUTES}
    heldout_names = {heldout.name() for _ in range(2000)}
    assert not train_names & heldout_names
    assert any(" " in n for n in heldout_names) and any(" " in n for n in train_names)  # first + last names
    assert not train_values & {(a, heldout.value(a)) for _ in range(300) for a in ATTRIBUTES}


def test_training_names_span_the_alphabet():
    gen = CorpusGenerator(1, TRAIN)
    letters = set("".join(gen.name() for _ in range(2000)).lower())
    assert set("abcdefghijklmnopqrstuvwxyz") <= letters


def test_seeded_and_prose_split_is_disjoint():
    assert CorpusGenerator(5).qa() == CorpusGenerator(5).qa()
    train, heldout = prose_split()
    assert train and heldout and not set(train) & set(heldout)
