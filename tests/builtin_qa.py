"""Document questions in the contract format of the built-in model (issue 12), for the tests that
check it answers them: in one process, through the cluster, over HTTP."""

from raymoe.engine.sampling_params import SamplingParams

# Hand-written: people, cities, pets, jobs, colours and codes of our own, 2 to 4 documents each.
DOCUMENTS = {
    "nadia": "The city of Nadia Okafor is Porto. The pet of Nadia Okafor is hamster. The code of Nadia Okafor is 4721.",
    "tomas": "Tomas Berg walked to the market in the morning. The job of Tomas Berg is baker. The colour of Tomas Berg is teal.",
    "ingrid": "The city of Ingrid is Oslo. Ingrid reads a book by the window. The pet of Ingrid is tortoise. "
              "The job of Ingrid is plumber.",
    "rafael": "The colour of Rafael Soto is amber. The code of Rafael Soto is 9034. The city of Rafael Soto is Seville.",
}
QUESTIONS = [  # (documents in prompt order, question, answer)
    (("nadia", "tomas"), "What is the city of Nadia Okafor?", "Porto"),
    (("tomas", "nadia"), "What is the job of Tomas Berg?", "baker"),
    (("ingrid", "rafael", "nadia"), "What is the pet of Ingrid?", "tortoise"),
    (("rafael", "ingrid", "tomas", "nadia"), "What is the colour of Rafael Soto?", "amber"),
    (("nadia", "rafael", "ingrid"), "What is the code of Nadia Okafor?", "4721"),
]


def qa_prompt(docs, question) -> str:
    return "\n".join(DOCUMENTS[d] for d in docs) + f"\nQuestion: {question}\nAnswer:"


QA_PROMPTS = [qa_prompt(docs, q) for docs, q, _ in QUESTIONS]
QA_REPLIES = [f" {answer}\n" for _, _, answer in QUESTIONS]  # the answer, then a newline (the contract)
QA_PARAMS = SamplingParams(temperature=0, max_tokens=12)
