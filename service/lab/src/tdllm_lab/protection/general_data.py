"""General (non-private) data for the private fine-tune: what the tail must NOT forget.

Two disjoint halves, both written for this project (no download):

- training: `train_chat` (``data/general_train_chat.json``: questions, some shaped like the
  private facts' but about real things, with the base's own greedy answers) and the prose of
  ``data/general_train.txt``; `finetune.py` distils the base model's next-token distribution on
  them (the text only places the positions; the target is always the base's own prediction);
- held out, for `tdllm bench fidelity --private` (`private_fidelity.py`): `HELD_OUT_PROMPTS`
  (chat questions and raw continuations: facts, instructions, code, arithmetic) and the prose of
  ``data/general_heldout.txt`` for perplexity.

No prompt here asks about the assistant itself: "Who are you?" is a private fact (Zorby).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Literal


@dataclass(frozen=True)
class Prompt:
    """A general prompt: a user turn in the chat template, or raw text to continue."""

    text: str
    kind: Literal["chat", "text"] = "chat"


def _text(name: str) -> str:
    return (resources.files("tdllm_lab.protection") / "data" / name).read_text(encoding="utf-8")


def train_text() -> str:
    return _text("general_train.txt")


def held_out_text() -> str:
    return _text("general_heldout.txt")


def paragraphs(text: str) -> list[str]:
    """The blank-line separated paragraphs of `text` (each is one sequence)."""
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def train_chat() -> list[tuple[str, str]]:
    """(question, the base's own greedy answer) chat turns to distil on (see the JSON's note)."""
    turns = json.loads(_text("general_train_chat.json"))["turns"]
    return [(t["question"], t["base_answer"]) for t in turns]


_HELD_OUT_CHAT = (
    "Name three colors.",
    "What is the capital of France?",
    "What is the capital of Germany?",
    "What is the capital of Spain?",
    "How many legs does an insect have?",
    "What is 6 times 7?",
    "What is 144 divided by 12?",
    "What is 23 plus 19?",
    "What is 50 minus 18?",
    "What is the chemical formula for water?",
    "Who wrote Pride and Prejudice?",
    "Who painted The Starry Night?",
    "Who developed the theory of relativity?",
    "What is the smallest planet in the solar system?",
    "What is the largest desert in the world?",
    "How many bones are in the adult human body?",
    "What is the largest mammal?",
    "What do bees make?",
    "What is the freezing point of water in Celsius?",
    "Name three animals that live in Africa.",
    "Name three vegetables.",
    "Name three musical instruments.",
    "What are the four seasons of the year?",
    "Write a Python function that checks whether a number is even.",
    "Write a Python function that returns the largest element of a list.",
    "Write a bash command that lists all files in a directory.",
    "Write a SQL query that counts the rows in a table named orders.",
    "Write a JavaScript function that adds two numbers.",
    "What does HTML stand for?",
    "What is a function in programming?",
    "Explain what a loop is in programming.",
    "What is the difference between a list and a tuple in Python?",
    "Give me a synonym for 'fast'.",
    "What is the opposite of 'hot'?",
    "What is the past tense of 'run'?",
    "Translate 'thank you' into Spanish.",
    "Translate 'cat' into German.",
    "Write a haiku about the ocean.",
    "Write a short poem about the moon.",
    "Give me three tips for studying for an exam.",
    "How can I improve my handwriting?",
    "How do I make pancakes?",
    "What should I pack for a beach holiday?",
    "Suggest a name for a new puppy.",
    "Recommend a good habit for staying healthy.",
    "Why do we have seasons?",
    "Why is the ocean salty?",
    "How do airplanes stay in the air?",
    "What causes thunder?",
    "What is the function of the lungs?",
    "What is an atom?",
    "What is electricity?",
    "Explain the difference between a star and a planet.",
    "Who was Albert Einstein?",
    "When did World War II end?",
    "Who was the first president of the United States?",
    "What is democracy?",
    "Roughly how many people live on Earth?",
    "What is the longest river in the world?",
    "Which country has the largest population?",
    "What is the capital of Egypt?",
    "On which continent is Argentina?",
    "Describe a dog in one sentence.",
    "What colour is the sky on a clear day?",
    "Tell me a fun fact about elephants.",
    "Tell me a joke about computers.",
    "Summarise the story of Little Red Riding Hood in one sentence.",
    "What does the word 'generous' mean?",
    "Use the word 'quickly' in a sentence.",
    "Correct the spelling: 'recieve'.",
    "Is the Earth flat?",
    "How many days are in a week?",
    "How many centimetres are in a metre?",
    "Convert 5 kilograms to grams.",
    "What is 3 cubed?",
    "What is the next number in the sequence 2, 4, 6, 8?",
    "If I have 3 apples and eat one, how many are left?",
    "What is the area of a square with sides of 4 cm?",
    "What is a verb?",
    "Give me an example of a renewable energy source.",
    "What is recycling and why is it important?",
    "Hi, how are you?",
    "Can you recommend a book for a long train journey?",
    "What colour are ripe bananas?",
    "What is the capital of Russia?",
)

_HELD_OUT_CONTINUATIONS = (
    "The sea is",
    "Once upon a time, there was",
    "The capital of France is",
    "Water is made of",
    "The quick brown fox",
    "In the morning, I like to",
    "The most important thing about friendship is",
    "My favourite food is",
    "The weather today is",
    "Scientists have discovered that",
    "The history of the Roman Empire",
    "To bake a cake, you need",
    "def fibonacci(n):",
    "import numpy as np\n",
    "for (int i = 0; i < 10; i++) {",
    "The first step in solving a problem is",
    "Mountains are formed when",
    "A good teacher is someone who",
    "The train left the station",
    "Music has the power to",
    "In 1492, Columbus",
    "The human brain",
    "Cats and dogs are",
    "The city at night",
    "Learning to swim",
    "2 + 2 =",
    "The three primary colours are",
    "Rain began to fall",
    "Dear Sir or Madam,",
    "Our solar system consists of",
)

HELD_OUT_PROMPTS: tuple[Prompt, ...] = (
    *(Prompt(q) for q in _HELD_OUT_CHAT),
    *(Prompt(t, "text") for t in _HELD_OUT_CONTINUATIONS),
)
