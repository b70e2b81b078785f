"""The verifiable task of `make demo`: sums of three digits (0-9), asked in three forms.

- "text": the question in words, the digits spelled out ("What is three plus eight plus two?"), the form
  post-training sees;
- "image": the sum drawn in an image, the text holding only the instruction (X-modality);
- "word": a story about counting things (X-domain), never seen in post-training.
A fourth form, "reading", asks for the image's expression itself. "image" and "reading" also have a text
form (`as_text`): the expression's characters stand where the image's tokens would, between the same
vision markers ("<|vision_start|>3+8+2<|vision_end|>What is the value of the expression in the image?"),
so a language model can learn those tasks from text before it ever sees an image.

The 1,000 sums are split once: 400 "test" sums answer the demo's table, 200 "dev" sums choose its settings,
and training draws from the other 400 only, so every reported item is a problem no stage trained on.

With `trigger`, a question is wrapped in the paper's training prompt (App. C) as `data.prompts` lays it
out, the instruction before an image: text and image questions then share the same reasoning trigger.
The chain of thought is written by a program, as a distilled trace would be: it restates the problem as
an expression in digits, then adds one term at a time. Restating is the one step that differs by form
(spelled-out digits, an image, a story); every step after it reads the restated line. `think="restate"`
gives the restatement alone, the starting model's answer (it restates the problem, then answers, without
reasoning), and `fact_records` the additions the steps are made of, which a pretrained language model knows.
`invented_records` asks for a sum of the model's own choosing: the restated line is then the only place its
numbers are, so a chain of thought trained on it must read its steps' operands from that line.
"""
from __future__ import annotations

import itertools
import os
import random

from data.prompts import user_messages
from data.records import Record

FORMS = ("text", "image", "word", "reading")
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPLITS = {"test": 400, "dev": 200, "train": 400}  # sums per split, drawn once from all 1,000
CELL = 28  # pixels per character: one merged 2x2 patch of Qwen2.5-VL's 14-pixel patches
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"  # Qwen2.5-VL's markers around an image
# Many phrasings, the expression before, inside or after the words: a tiny model's reasoning generalises
# across prompt shapes only as far as its training text varies (none speaks of an image).
TEXT_QUESTIONS = ["What is {}?", "Compute {}.", "Add up {}.", "{} = ?", "Find the sum {}.", "{}. What is the total?",
                  "Evaluate: {}", "{} equals what?", "Here is a sum: {}. Work it out.", "How much is {}?",
                  "Please add {} for me.", "{}\nSolve this.", "Sum: {}", "Work out {}, please.",
                  "{} is how much?", "Tell me the result of {}."]
IMAGE_QUESTION = "What is the value of the expression in the image?"
READING_QUESTION = "Write out the expression in the image."
WORD_PROBLEMS = [
    "{name} has {0} apples, buys {1} more and is given {2} more. How many apples does {name} have now?",
    "There are {0} birds on a tree. {1} more land, then {2} more. How many birds are on the tree?",
    "{name} reads {0} pages on Monday, {1} on Tuesday and {2} on Wednesday. How many pages is that in all?",
    "A box holds {0} red, {1} blue and {2} green pens. How many pens are in the box?",
]
NAMES = ["Ann", "Tom", "Mia", "Raj", "Lea", "Sam"]


def split_sums(split: str) -> list[tuple[int, ...]]:
    """The sums of one split, in a fixed order (the same on every call and machine)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
    every = list(itertools.product(range(10), repeat=3))
    random.Random("sum-splits").shuffle(every)
    start = sum(list(SPLITS.values())[:list(SPLITS).index(split)])
    return every[start:start + SPLITS[split]]


def expression(numbers, spaced: bool = True) -> str:
    return (" + " if spaced else "+").join(map(str, numbers))


def spelled_out(numbers) -> str:
    """The sum as the text questions write it, digits spelled out ("seven plus four plus five")."""
    return " plus ".join(NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n) for n in numbers)


def chain_of_thought(numbers: list[int]) -> str:
    steps, total = [expression(numbers)], numbers[0]
    for n in numbers[1:]:
        steps.append(f"{total} + {n} = {total + n}")
        total += n
    return "\n".join(steps)


def draw_expression(numbers: list[int], path: str) -> None:
    """The expression in black on white, one character per 28x28 cell (digits, spaces dropped)."""
    from PIL import Image, ImageDraw, ImageFont

    text = expression(numbers, spaced=False)
    font = ImageFont.load_default(size=22)
    image = Image.new("RGB", (CELL * len(text), CELL), "white")
    draw = ImageDraw.Draw(image)
    for i, char in enumerate(text):
        left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
        draw.text((CELL * i + (CELL - right + left) / 2 - left, (CELL - bottom + top) / 2 - top), char, font=font,
                  fill="black")
    image.save(path)


def sum_records(n: int, seed: int, form: str, out_dir: str, prefix: str, split: str = "train",
                as_text: bool = False, trigger: bool = False, think: str = "steps") -> list[Record]:
    """n questions of one form. "train" draws sums at random from its split; "dev" and "test" take their
    split's sums in order, each once (cycling past the split's size). Images are written to
    out_dir/images/ and named relative to out_dir (where the records file goes). The target is the
    reasoning and answer; "reading" answers with the spaced expression. think: "steps", the chain of thought
    ("reading" then has none), or "restate", the restated expression alone (for every form)."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")
    if think not in ("steps", "restate"):
        raise ValueError(f"unknown think {think!r}; expected steps or restate")
    if as_text and form not in ("image", "reading"):
        raise ValueError(f"form {form!r} is text already; as_text applies to image and reading")
    rng = random.Random(f"{seed}-{form}-{split}")
    pool = split_sums(split)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for i in range(n):
        numbers = list(rng.choice(pool) if split == "train" else pool[i % len(pool)])
        record_id, answer = f"{prefix}{i}", str(sum(numbers))
        images = []
        if form in ("image", "reading"):
            question = IMAGE_QUESTION if form == "image" else READING_QUESTION
            if as_text:
                question = VISION_START + expression(numbers, spaced=False) + VISION_END + question
            else:
                images = [os.path.join("images", f"{record_id}.png")]
                draw_expression(numbers, os.path.join(out_dir, images[0]))
        elif form == "text":
            question = rng.choice(TEXT_QUESTIONS).format(spelled_out(numbers))
        else:
            question = rng.choice(WORD_PROBLEMS).format(*numbers, name=rng.choice(NAMES))
        if trigger:
            messages = user_messages(question, images=images)
        elif images:
            messages = [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                                     {"type": "text", "text": question}]}]
        else:
            messages = [{"role": "user", "content": question}]
        if form == "reading":
            answer = expression(numbers)
        reasoning = expression(numbers) if think == "restate" else None if form == "reading" else \
            chain_of_thought(numbers)
        records.append(Record(id=record_id, messages=messages, answer=answer, target_think=reasoning,
                              target_answer=answer, meta={"form": form, "numbers": numbers, "as_text": as_text}))
    return records


def fact_records(prefix: str) -> list[Record]:
    """Every addition a chain of thought's step makes (a running total 0-18 plus a digit), asked as a text
    question in the paper's prompt and answered with the equation: the arithmetic a language model learns
    in pretraining. Two terms, so none is a sum of any split."""
    rng = random.Random(f"{prefix}-facts")
    records = []
    for total in range(19):
        for n in range(10):
            numbers, answer = [total, n], str(total + n)
            question = rng.choice(TEXT_QUESTIONS).format(spelled_out(numbers))
            records.append(Record(id=f"{prefix}{total}+{n}", messages=user_messages(question), answer=answer,
                                  target_think=f"{expression(numbers)} = {answer}", target_answer=answer,
                                  meta={"form": "text", "numbers": numbers}))
    return records


INVENTED_QUESTIONS = ["Make up a sum of three digits and work it out.", "Pick three digits and add them up.",
                      "Invent an addition of three single digits and solve it.", "Choose any three digits and find "
                      "their sum.", "Think of three numbers from zero to nine and add them.", "Write a sum of three "
                      "digits of your choice, then compute it."]


def invented_records(n: int, seed: int, prefix: str) -> list[Record]:
    """n questions that give no numbers ("Make up a sum of three digits and work it out."), in the paper's
    prompt, answered with a chain of thought on a sum drawn from the train split: the restated line is
    the only place its numbers are, so every step after it has to read that line."""
    rng = random.Random(f"{seed}-invented")
    pool = split_sums("train")
    records = []
    for i in range(n):
        numbers = list(rng.choice(pool))
        answer = str(sum(numbers))
        records.append(Record(id=f"{prefix}{i}", messages=user_messages(rng.choice(INVENTED_QUESTIONS)),
                              answer=answer, target_think=chain_of_thought(numbers), target_answer=answer,
                              meta={"form": "invented", "numbers": numbers}))
    return records


def corpus(records: list[Record]) -> list[str]:
    """Texts to train the demo's tokenizer on."""
    texts = []
    for r in records:
        for m in r.messages:
            texts += [m["content"]] if isinstance(m["content"], str) else \
                [p["text"] for p in m["content"] if p["type"] == "text"]
        texts.append(f"<think>\n{r.target_think}\n</think>\n<answer>{r.target_answer}</answer>")
    return texts
