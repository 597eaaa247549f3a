"""The built-in model's training text: prose, document question answering and numbers.

Everything is drawn from a seeded `random.Random`, so a seed gives the same text on every machine.
Document QA follows the contract of issue 12, exactly:

    <document 1>
    ...
    <document n>            (2 to 8 documents, one paragraph each, one line each)
    Question: What is the <attribute> of <name>?
    Answer: <value>

A document is 2 to 6 sentences `The <attribute> of <name> is <value>.` about one person, mixed
with a few filler sentences. Training names and values are made-up words built from syllables
that span the alphabet (and, given `pieces`, from the tokenizer's word pieces), next to word lists;
`split="heldout"` uses ordinary English first names and surnames and real words that
`split="train"` never produces, so a model that answers held-out questions copies from its
context instead of remembering.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources

ATTRIBUTES = ("city", "colour", "job", "pet", "code", "food", "sport", "flower")
CONTRACT_ATTRIBUTES = ("city", "colour", "job", "pet", "code")  # the ones issue 12 names
TRAIN, HELDOUT = "train", "heldout"

# every letter of the alphabet starts or fills some syllable: a name's tokens then span the tokenizer
_ONSETS = "b c d f g h j k l m n p r s t v w x y z br cr dr fr gr kr pl pr st tr sh ch th wh qu sk sl sn sp fl gl bl cl".split()
_VOWELS = "a e i o u y ai ea ee oo ei au ou ie oa".split()
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "x", "ck", "nd", "th", "z", "t", "ng", "k", "ph"]

# held-out names: ordinary English first names and surnames, never produced by the training split
_HELDOUT_FIRST = (
    "James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara Richard Susan "
    "Joseph Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy Matthew Betty Anthony Sandra "
    "Mark Margaret Donald Ashley Steven Kimberly Andrew Emily Paul Donna Joshua Michelle Kenneth Carol "
    "Kevin Amanda Brian Melissa George Deborah Timothy Stephanie Oliver Emma Harry Sophie Jack Grace "
    "Alice Henry Lucy Edward Hannah Samuel Chloe Peter Olivia Rachel Simon Laura Victor Helen Arthur Irene"
).split()
_HELDOUT_LAST = (
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Wilson "
    "Anderson Taylor Moore Jackson Martin Lee Thompson White Harris Clark Lewis Robinson Walker Young "
    "Allen King Wright Scott Green Baker Adams Nelson Hill Campbell Mitchell Roberts Carter Phillips Evans "
    "Turner Parker Collins Edwards Stewart Morris Murphy Cook Rogers Morgan Cooper Peterson Reed Bailey"
).split()

_WORDS = {  # (train words, held-out words): a value is a word or a syllable-built pseudo-word
    "city": (
        "Paris Lisbon Oslo Dublin Vienna Cairo Lima Quito Hanoi Delhi Madrid Berlin Prague Rome Athens "
        "Boston Denver Austin Seattle Toronto Sydney Perth Nairobi Accra Dakar Tunis Riga Tallinn Minsk "
        "Kyiv Warsaw Krakow Zurich Geneva Milan Naples Porto Seville Bristol Leeds Glasgow Cardiff York "
        "Bergen Malmo Turku Ghent Bruges Lyon Nice Bonn Munich Hamburg Dresden Graz Split Sofia".split(),
        "Helsinki Reykjavik Santiago Montreal Auckland Kampala Chicago London Tokyo Mumbai Beijing Istanbul "
        "Moscow Havana Manila Jakarta Lagos Brisbane Edinburgh Florence Venice Barcelona Amsterdam".split(),
    ),
    "colour": (
        "red blue green yellow orange purple pink brown black white grey gold silver violet indigo "
        "crimson scarlet maroon navy teal cyan lime olive amber beige ivory cream coral salmon peach "
        "lavender lilac plum magenta turquoise azure cobalt emerald jade bronze copper rust tan khaki".split(),
        "mauve ochre sepia vermilion chartreuse cerulean mustard charcoal burgundy saffron fuchsia aquamarine".split(),
    ),
    "job": (
        "baker teacher farmer doctor nurse pilot sailor writer painter singer dancer miner builder "
        "carpenter plumber tailor butcher chef waiter driver lawyer judge banker clerk poet actor "
        "gardener fisher hunter weaver potter smith mason barber cook guard soldier scientist engineer "
        "architect dentist vet librarian porter courier".split(),
        "astronomer goldsmith cartographer locksmith glazier falconer accountant electrician mechanic "
        "journalist pharmacist photographer".split(),
    ),
    "pet": (
        "dog cat rabbit hamster parrot goldfish turtle mouse rat ferret pony horse goat sheep lizard "
        "snake frog canary pigeon duck goose hen owl crow tortoise guinea pig hedgehog".split(),
        "iguana chinchilla gecko axolotl cockatoo alpaca budgie parakeet donkey llama tarantula".split(),
    ),
    "food": (
        "bread rice soup cheese apples pears plums cherries beans noodles pasta pizza salad eggs "
        "honey jam porridge pancakes dumplings curry stew fish oranges grapes figs dates olives".split(),
        "lasagne risotto couscous falafel omelette tapioca".split(),
    ),
    "sport": (
        "tennis football rugby cricket hockey golf boxing rowing sailing skiing cycling running "
        "swimming fencing archery chess karate judo climbing diving surfing skating".split(),
        "badminton lacrosse curling polo handball squash".split(),
    ),
    "flower": (
        "rose tulip daisy lily orchid violet poppy iris lotus sunflower daffodil peony lilac "
        "jasmine clover heather marigold bluebell primrose".split(),
        "camellia magnolia begonia gardenia hyacinth azalea".split(),
    ),
}
_HELDOUT_NAMES = set(_HELDOUT_FIRST) | {f"{a} {b}" for a in _HELDOUT_FIRST for b in _HELDOUT_LAST}
_CITY_SUFFIXES = ("ton", "ford", "by", "port", "wick", "field", "burg", "mouth", "dale", "stead")

_SUBJECTS = (
    "the old man", "the young woman", "a small boy", "the teacher", "my neighbour", "the farmer",
    "a tired traveller", "the captain", "her brother", "the baker", "a quiet girl", "the doctor",
    "our friend", "the gardener", "his sister", "the children", "the fisherman", "a stranger",
)
_VERBS = (
    "walked to", "looked at", "painted", "carried", "found", "cleaned", "visited", "opened",
    "watched", "left", "repaired", "remembered", "closed", "followed", "described", "bought",
)
_OBJECTS = (
    "the garden", "the market", "a wooden box", "the river", "the red door", "an old map", "the bridge",
    "the kitchen", "a letter", "the harbour", "the small boat", "the library", "a basket of apples",
    "the hill", "the station", "the lamp", "the field", "a blue kite", "the school", "the window",
)
_TIMES = (
    "in the morning", "after lunch", "before dark", "on Sunday", "every day", "at noon", "last week",
    "in the spring", "during the storm", "at dawn", "late at night", "in the summer",
)
_FILLERS_ABOUT = (
    "{n} likes to walk by the river in the evening.",
    "{n} lives in a small house with a green door.",
    "{n} reads a book before going to sleep.",
    "Everyone in the village knows {n}.",
    "{n} has two brothers and one sister.",
    "On weekends {n} visits the market.",
    "{n} learned to swim at the age of seven.",
    "{n} often writes letters to old friends.",
    "People say that {n} tells good stories.",
    "{n} keeps a diary on the kitchen table.",
    "{n} wakes up early every morning.",
    "Last year {n} planted a tree in the garden.",
)


@dataclass(frozen=True)
class QAExample:
    """One document-QA prompt: `prompt` ends with 'Answer:'; the completion is ' ' + answer + '\\n'."""

    documents: tuple[str, ...]
    question: str
    answer: str
    num_docs: int

    @property
    def prompt(self) -> str:
        return "\n".join(self.documents) + "\n" + self.question + "\nAnswer:"


class CorpusGenerator:
    """Seeded text generator; `split` picks the training or the held-out pools of names and values."""

    def __init__(self, seed: int, split: str = TRAIN, pieces: tuple[str, ...] = ()):
        """`pieces`: lower-case letter strings (the tokenizer's word pieces) that training names and
        values are also built from, so that copying is learnt on every token, not on a few."""
        if split not in (TRAIN, HELDOUT):
            raise ValueError(f"split must be {TRAIN!r} or {HELDOUT!r}, got {split!r}")
        self.rng = random.Random(seed)
        self.split = split
        self.pieces = tuple(pieces)
        heldout = split == HELDOUT
        self._words = {k: v[1] if heldout else v[0] for k, v in _WORDS.items()}
        self._never = set() if heldout else _HELDOUT_NAMES | {(a, w) for a, v in _WORDS.items() for w in v[1]}

    # names and values

    def pseudo_word(self, syllables: int) -> str:
        """A pronounceable word from syllables spanning the alphabet (or, half the time, word pieces)."""
        rng = self.rng
        if self.pieces and rng.random() < 0.5:
            return "".join(rng.choice(self.pieces) for _ in range(syllables))
        return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))

    def name(self) -> str:
        """Training: one or two made-up words; held out: an ordinary English first name (and surname)."""
        rng = self.rng
        if self.split == HELDOUT:
            first = rng.choice(_HELDOUT_FIRST)
            return first if rng.random() < 0.5 else f"{first} {rng.choice(_HELDOUT_LAST)}"
        while True:
            words = [self.pseudo_word(rng.choice((1, 2, 2, 3))).capitalize() for _ in range(rng.choice((1, 1, 2)))]
            name = " ".join(words)
            if name not in self._never:
                return name

    def code(self) -> str:
        """A 4-digit code: training codes have an even digit sum, held-out ones an odd one."""
        while True:
            code = "".join(self.rng.choice("0123456789") for _ in range(4))
            if (sum(map(int, code)) % 2 == 1) == (self.split == HELDOUT):
                return code

    def value(self, attribute: str) -> str:
        rng = self.rng
        if attribute == "code":
            return self.code()
        if self.split == HELDOUT or rng.random() < 0.4:
            return rng.choice(self._words[attribute])
        while True:
            word = self.pseudo_word(rng.choice((1, 2, 2, 3)))
            if attribute == "city":
                word = word.capitalize()
                word = word + rng.choice(_CITY_SUFFIXES) if rng.random() < 0.3 else word
            if (attribute, word) not in self._never:
                return word

    # sentences

    def prose_sentence(self) -> str:
        rng = self.rng
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        if rng.random() < 0.6:
            s += " " + rng.choice(_TIMES)
        return s[0].upper() + s[1:] + "."

    def filler(self, name: str) -> str:
        if self.rng.random() < 0.5:
            return self.rng.choice(_FILLERS_ABOUT).format(n=name)
        return self.prose_sentence()

    def document(self, name: str, facts: dict[str, str], max_fillers: int = 3) -> str:
        """One paragraph: the fact sentences in random order with 0-max_fillers filler sentences mixed in."""
        sentences = [f"The {a} of {name} is {v}." for a, v in facts.items()]
        for _ in range(self.rng.randint(0, max_fillers)):
            sentences.insert(self.rng.randint(0, len(sentences)), self.filler(name))
        return " ".join(sentences)

    def qa(self, num_docs: int | None = None, attributes: tuple[str, ...] = ATTRIBUTES, max_facts: int = 6,
           max_fillers: int = 3) -> QAExample:
        rng = self.rng
        n = num_docs or rng.randint(2, 8)
        names: list[str] = []
        while len(names) < n:
            candidate = self.name()  # first words differ too: "David" and "David Smith" are not both asked of
            if candidate.split()[0] not in {x.split()[0] for x in names}:
                names.append(candidate)
        docs, all_facts = [], []
        for person in names:
            chosen = rng.sample(attributes, rng.randint(2, min(max_facts, len(attributes))))
            facts = {a: self.value(a) for a in chosen}
            all_facts.append(facts)
            docs.append(self.document(person, facts, max_fillers))
        target = rng.randrange(n)
        attribute = rng.choice(sorted(all_facts[target]))
        question = f"Question: What is the {attribute} of {names[target]}?"
        return QAExample(tuple(docs), question, all_facts[target][attribute], n)

    def quiz(self, example: QAExample, k: int) -> list[tuple[str, str]]:
        """k extra (question line, answer) pairs about any document of `example`, for training only.

        They read `Quiz: What is the <attribute> of <name>?` so that a prompt whose last line starts
        with `Question:` (the contract) is always answered once, followed by the end of text.
        """
        pairs = []
        for doc in self.rng.sample(example.documents, min(k, len(example.documents))):
            facts = [s for s in doc.split(". ") if s.startswith("The ") and " of " in s and " is " in s]
            head, value = self.rng.choice(facts).rstrip(".").rsplit(" is ", 1)
            attribute, name = head[len("The ") :].split(" of ", 1)
            pairs.append((f"Quiz: What is the {attribute} of {name}?", value))
        return pairs

    def prose_paragraph(self) -> str:
        return " ".join(self.prose_sentence() for _ in range(self.rng.randint(3, 7)))

    def numbers(self) -> str:
        """Counting, sums and digit strings."""
        rng = self.rng
        kind = rng.randrange(3)
        if kind == 0:
            start, step = rng.randint(0, 950), rng.choice((1, 1, 2, 5, 10))
            return "Count: " + " ".join(str(start + i * step) for i in range(rng.randint(5, 12)))
        if kind == 1:
            lines = []
            for _ in range(rng.randint(2, 5)):
                a, b = rng.randint(0, 50), rng.randint(0, 50)
                lines.append(f"{a} + {b} = {a + b}")
            return "\n".join(lines)
        seq = [self.code() for _ in range(rng.randint(2, 5))]
        return "Codes: " + ", ".join(seq) + ". Again: " + ", ".join(seq) + "."


def corpus_paragraphs() -> list[str]:
    """The packaged prose (`builtin_corpus.txt`), one paragraph per item."""
    text = resources.files("raymoe.model").joinpath("builtin_corpus.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def prose_split() -> tuple[list[str], list[str]]:
    """(train, held-out) corpus paragraphs: every tenth paragraph is held out for perplexity."""
    paras = corpus_paragraphs()
    return [p for i, p in enumerate(paras) if i % 10 != 9], [p for i, p in enumerate(paras) if i % 10 == 9]
