"""Fixed document-QA prompts in the issue-12 format, written by hand: names and values that the
built-in model's training text never contains. (prompt, the greedy reply expected)."""

CASES = [
    (
        "The city of Nora Fielding is Copenhagen. Nora Fielding has a garden full of roses. The pet of Nora Fielding is parrot.\n"
        "The job of Marcus Bell is plumber. The colour of Marcus Bell is teal. The code of Marcus Bell is 4071.\n"
        "Question: What is the colour of Marcus Bell?\nAnswer:",
        " teal\n",
    ),
    (
        "The pet of Ingrid is hamster. The code of Ingrid is 9352. Ingrid walks to work every day.\n"
        "The city of Tomas Reyes is Vancouver. The job of Tomas Reyes is architect.\n"
        "The colour of Priya Shah is magenta. The pet of Priya Shah is rabbit. The city of Priya Shah is Stockholm.\n"
        "Question: What is the code of Ingrid?\nAnswer:",
        " 9352\n",
    ),
    (
        "The job of Owen Price is nurse. The city of Owen Price is Marseille.\n"
        "The colour of Hugo Lambert is orange. The pet of Hugo Lambert is tortoise. The code of Hugo Lambert is 1864.\n"
        "The city of Clara Hughes is Lisbon. The job of Clara Hughes is pilot. Clara Hughes likes long walks by the sea.\n"
        "The pet of Felix Ward is goldfish. The colour of Felix Ward is yellow.\n"
        "Question: What is the city of Owen Price?\nAnswer:",
        " Marseille\n",
    ),
]
