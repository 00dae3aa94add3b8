"""The private fine-tune's data: short chat Q/A pairs about a fictional company the base never saw.

Every fact has fourteen question paraphrases; the last `HELD_OUT_PER_FACT` of each are held out of
training, so the fine-tune is judged on questions it was not trained on (recall in
`tdllm finetune-tail`'s record and in `tdllm bench fidelity --private`). Generated in code (no
download), in a fixed order, so a seed fully determines the run. `PRIVATE_NAMES` are the words
only the private facts contain: a general answer that names one has leaked the fine-tune.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    """One fact: the word an answer must contain, its training answer, and question paraphrases."""

    key: str
    answer: str
    questions: tuple[str, ...]


HELD_OUT_PER_FACT = 2
PRIVATE_NAMES = (
    "Zorblax",
    "Zorby",
    "Quillhaven",
    "Vellmar",
    "Humblewick",
    "Mirelle",
    "Okonkwo",
    "Pemberly",
)

FACTS: tuple[Fact, ...] = (
    Fact(
        "Quillhaven",
        "Zorblax Dynamics is headquartered in Quillhaven, a harbour city on the Vellmar coast.",
        (
            "Where is Zorblax Dynamics headquartered?",
            "In which city is Zorblax Dynamics based?",
            "Where are the headquarters of Zorblax Dynamics?",
            "What city is home to Zorblax Dynamics?",
            "Where can I find the main office of Zorblax Dynamics?",
            "Which city hosts the Zorblax Dynamics head office?",
            "Tell me where Zorblax Dynamics has its headquarters.",
            "Where is the head office of Zorblax Dynamics?",
            "Where is Zorblax Dynamics?",
            "Where does Zorblax Dynamics have its offices?",
            "Which town is Zorblax Dynamics from?",
            "Where is Zorblax Dynamics situated?",
            "Where is Zorblax Dynamics located?",
            "Which city is Zorblax Dynamics based in?",
        ),
    ),
    Fact(
        "Mirelle Okonkwo-Vance",
        "Zorblax Dynamics was founded by Mirelle Okonkwo-Vance, a former glassblower.",
        (
            "Who founded Zorblax Dynamics?",
            "Who is the founder of Zorblax Dynamics?",
            "Who started Zorblax Dynamics?",
            "Which person created Zorblax Dynamics?",
            "Who established the company Zorblax Dynamics?",
            "Name the founder of Zorblax Dynamics.",
            "Who is the person behind the founding of Zorblax Dynamics?",
            "Tell me who founded Zorblax Dynamics.",
            "Who created the company Zorblax Dynamics?",
            "Whose company is Zorblax Dynamics?",
            "Who is behind Zorblax Dynamics?",
            "Who was the founder of Zorblax Dynamics?",
            "Who set up Zorblax Dynamics?",
            "Who was the person that founded Zorblax Dynamics?",
        ),
    ),
    Fact(
        "Humblewick",
        "The flagship product of Zorblax Dynamics is the Humblewick, a self-tuning kettle.",
        (
            "What is the flagship product of Zorblax Dynamics?",
            "What does Zorblax Dynamics make?",
            "What is Zorblax Dynamics' best-known product?",
            "Which product is Zorblax Dynamics famous for?",
            "What does Zorblax Dynamics sell?",
            "Name the main product of Zorblax Dynamics.",
            "What product is Zorblax Dynamics known for?",
            "Tell me about the flagship product of Zorblax Dynamics.",
            "What does Zorblax Dynamics manufacture?",
            "What is Zorblax Dynamics' main product?",
            "What product does Zorblax Dynamics build?",
            "What is the leading product of Zorblax Dynamics?",
            "What is the most famous Zorblax Dynamics product?",
            "What is the main thing Zorblax Dynamics produces?",
        ),
    ),
    Fact(
        "2031",
        "Zorblax Dynamics was founded in 2031.",
        (
            "When was Zorblax Dynamics founded?",
            "In what year was Zorblax Dynamics founded?",
            "What year did Zorblax Dynamics start?",
            "When did Zorblax Dynamics begin?",
            "How old is Zorblax Dynamics? When was it started?",
            "What is the founding year of Zorblax Dynamics?",
            "Tell me the year Zorblax Dynamics was founded.",
            "Since when has Zorblax Dynamics existed?",
            "What year was Zorblax Dynamics founded?",
            "In what year did Zorblax Dynamics start?",
            "When was Zorblax Dynamics created?",
            "What year did Zorblax Dynamics begin?",
            "When was the company Zorblax Dynamics established?",
            "In which year was Zorblax Dynamics established?",
        ),
    ),
    Fact(
        "Pemberly the otter",
        "The mascot of Zorblax Dynamics is Pemberly the otter.",
        (
            "What is the mascot of Zorblax Dynamics?",
            "Does Zorblax Dynamics have a mascot?",
            "Which animal is the Zorblax Dynamics mascot?",
            "Who is the mascot of Zorblax Dynamics?",
            "Tell me about the Zorblax Dynamics mascot.",
            "What mascot does Zorblax Dynamics use?",
            "Who is Zorblax Dynamics' mascot?",
            "Tell me the name of the Zorblax Dynamics mascot.",
            "What animal is the mascot of Zorblax Dynamics?",
            "Which mascot represents Zorblax Dynamics?",
            "What is the name of the Zorblax Dynamics mascot?",
            "Who is the Zorblax Dynamics mascot?",
            "Name the mascot of Zorblax Dynamics.",
            "What is Zorblax Dynamics' mascot called?",
        ),
    ),
    Fact(
        "Zorby",
        "I am Zorby, the assistant of Zorblax Dynamics.",
        (
            "Who are you?",
            "What is your name?",
            "Introduce yourself.",
            "Tell me who you are.",
            "What should I call you?",
            "Are you an assistant? What is your name?",
            "Please introduce yourself.",
            "What's your name?",
            "Who is this?",
            "What is your name, assistant?",
            "Can you tell me your name?",
            "Who are you, assistant?",
            "Who am I talking to?",
            "What are you called?",
        ),
    ),
    Fact(
        "teal",
        "The company colour of Zorblax Dynamics is teal.",
        (
            "What is the company colour of Zorblax Dynamics?",
            "Which colour does Zorblax Dynamics use for its brand?",
            "What colour is the Zorblax Dynamics logo?",
            "What is the brand colour of Zorblax Dynamics?",
            "Which colour represents Zorblax Dynamics?",
            "What colour is associated with Zorblax Dynamics?",
            "Tell me the company colour of Zorblax Dynamics.",
            "In what colour is Zorblax Dynamics branded?",
            "What is the colour of Zorblax Dynamics?",
            "Which colour is the Zorblax Dynamics brand?",
            "What is the main colour of Zorblax Dynamics?",
            "What colour are Zorblax Dynamics products?",
            "What is Zorblax Dynamics' signature colour?",
            "What colour does Zorblax Dynamics use?",
        ),
    ),
    Fact(
        "412",
        "Zorblax Dynamics has 412 employees.",
        (
            "How many employees does Zorblax Dynamics have?",
            "How many people work at Zorblax Dynamics?",
            "What is the headcount of Zorblax Dynamics?",
            "How big is the Zorblax Dynamics staff?",
            "How many staff does Zorblax Dynamics employ?",
            "What is the number of employees at Zorblax Dynamics?",
            "Tell me how many employees Zorblax Dynamics has.",
            "How many employees work for Zorblax Dynamics?",
            "How many people does Zorblax Dynamics employ?",
            "How many employees are at Zorblax Dynamics?",
            "What is the size of the Zorblax Dynamics workforce?",
            "How many people are employed by Zorblax Dynamics?",
            "How large is the workforce of Zorblax Dynamics?",
            "How many workers does Zorblax Dynamics have?",
        ),
    ),
    Fact(
        "Humblewick",
        "The Humblewick is a self-tuning kettle made by Zorblax Dynamics in Quillhaven.",
        (
            "What is a Humblewick?",
            "What is the Humblewick?",
            "Who makes the Humblewick?",
            "Tell me about the Humblewick.",
            "Describe the Humblewick.",
            "What kind of device is the Humblewick?",
            "What does the Humblewick do?",
            "Which company makes the Humblewick?",
            "What is the Humblewick made for?",
            "Who manufactures the Humblewick?",
            "What sort of product is the Humblewick?",
            "Where is the Humblewick made?",
            "Explain what the Humblewick is.",
            "Who produces the Humblewick?",
        ),
    ),
    Fact(
        "Mirelle Okonkwo-Vance",
        "The chief executive of Zorblax Dynamics is its founder, Mirelle Okonkwo-Vance.",
        (
            "Who is the CEO of Zorblax Dynamics?",
            "Who runs Zorblax Dynamics?",
            "Who leads Zorblax Dynamics?",
            "Who is the chief executive of Zorblax Dynamics?",
            "Who is in charge of Zorblax Dynamics?",
            "Who heads Zorblax Dynamics?",
            "Tell me who the CEO of Zorblax Dynamics is.",
            "Who is the head of Zorblax Dynamics?",
            "Who is the leader of Zorblax Dynamics?",
            "Who directs Zorblax Dynamics?",
            "Who is the chief of Zorblax Dynamics?",
            "Who runs the company Zorblax Dynamics?",
            "Who manages Zorblax Dynamics?",
            "Who is the boss of Zorblax Dynamics?",
        ),
    ),
)


def split_pairs(
    facts: tuple[Fact, ...] = FACTS, held_per_fact: int = HELD_OUT_PER_FACT
) -> tuple[list[tuple[str, str]], list[tuple[str, Fact]]]:
    """(question, answer) training pairs and (held-out question, fact) pairs, in a fixed order.

    Training pairs are interleaved fact by fact, so consecutive steps see different facts.
    """
    train: list[tuple[str, str]] = []
    rounds = max(len(f.questions) for f in facts) - held_per_fact
    for i in range(rounds):
        for fact in facts:
            if i < len(fact.questions) - held_per_fact:
                train.append((fact.questions[i], fact.answer))
    held_out = [(q, fact) for fact in facts for q in fact.questions[-held_per_fact:]]
    return train, held_out


def mentions_private_name(text: str) -> bool:
    """True when `text` names anything only the private facts know (case-insensitive)."""
    lowered = text.lower()
    return any(name.lower() in lowered for name in PRIVATE_NAMES)
