"""A small verifiable reasoning task for `make demo`: sums of single digits, with a chain of thought
written by a program (standing in for distilled traces), in two forms: free answer, and the same
questions posed as multiple choice (a form the demo never trains on)."""
from __future__ import annotations

import random

from data.prompts import user_messages
from data.records import Record

LETTERS = "ABCD"


def arithmetic(rng: random.Random, terms: int = 3) -> tuple[str, str, str]:
    """(question, worked steps, answer) for a sum of `terms` single digits."""
    numbers = [rng.randint(0, 9) for _ in range(terms)]
    steps, total = [], numbers[0]
    for n in numbers[1:]:
        steps.append(f"{total} + {n} = {total + n}")
        total += n
    return "What is " + " + ".join(map(str, numbers)) + "?", "\n".join(steps), str(total)


def free_form(n: int, seed: int, terms: int = 3, prefix: str = "q") -> list[Record]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        question, steps, answer = arithmetic(rng, terms)
        records.append(Record(id=f"{prefix}{i}", messages=user_messages(question, style="train"), answer=answer,
                              target_think=steps, target_answer=answer))
    return records


def multiple_choice(n: int, seed: int, terms: int = 3, prefix: str = "mc") -> list[Record]:
    """The same kind of question with four numeric options; the gold answer is a letter."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        question, steps, answer = arithmetic(rng, terms)
        wrong = rng.sample([v for v in range(0, 9 * terms + 1) if str(v) != answer], 3)
        values = [answer] + [str(v) for v in wrong]
        rng.shuffle(values)
        options = dict(zip(LETTERS, values))
        gold = LETTERS[values.index(answer)]
        records.append(Record(id=f"{prefix}{i}", messages=user_messages(question, options, style="train"),
                              answer=gold, kind="choice", options=options, target_think=steps, target_answer=gold))
    return records


def corpus(records: list[Record]) -> list[str]:
    """Texts to train the demo's tokenizer on."""
    return [m["content"] for r in records for m in r.messages] + \
        [f"<think>\n{r.target_think}\n</think>\n<answer>{r.target_answer}</answer>" for r in records]
