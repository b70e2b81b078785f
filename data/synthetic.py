"""A small verifiable reasoning task for `make demo`: sums of small numbers with a chain of thought
written by a program (standing in for distilled traces). The demo trains on sums of three terms and
also evaluates sums of four, a longer form it never trains on."""
from __future__ import annotations

import random

from data.prompts import user_messages
from data.records import Record


def arithmetic(rng: random.Random, terms: int = 3, largest: int = 5) -> tuple[str, str, str]:
    """(question, worked steps, answer) for a sum of `terms` numbers from 1 to `largest`."""
    numbers = [rng.randint(1, largest) for _ in range(terms)]
    steps, total = [], numbers[0]
    for n in numbers[1:]:
        steps.append(f"{total} + {n} = {total + n}")
        total += n
    return "What is " + " + ".join(map(str, numbers)) + "?", "\n".join(steps), str(total)


def sums(n: int, seed: int, terms: int = 3, prefix: str = "q") -> list[Record]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        question, steps, answer = arithmetic(rng, terms)
        records.append(Record(id=f"{prefix}{i}", messages=user_messages(question, style="train"), answer=answer,
                              target_think=steps, target_answer=answer))
    return records


def corpus(records: list[Record]) -> list[str]:
    """Texts to train the demo's tokenizer on."""
    return [m["content"] for r in records for m in r.messages] + \
        [f"<think>\n{r.target_think}\n</think>\n<answer>{r.target_answer}</answer>" for r in records]
