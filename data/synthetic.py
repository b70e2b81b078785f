"""The verifiable task of `make demo`: sums of three one-digit numbers, asked in three forms.

- "text": the question in words and digits ("What is 3 + 8 + 2?"), the form post-training sees;
- "image": the sum drawn in an image, the text holding only the instruction (X-modality);
- "word": a story about counting things (X-domain), never seen in post-training.
A fourth form, "reading", asks for the image's expression itself: with direct answers in the other
three it makes the "instruct" starting model, one that reads images and answers without reasoning. Questions are asked
plainly, without the paper's prompt template: it would triple every sequence and teach a tiny model
nothing (the answer format comes from the training targets).

The chain of thought is written by a program, as a distilled trace would be: it restates the problem
as an expression, then adds one term at a time.
"""
from __future__ import annotations

import os
import random

from data.records import Record

FORMS = ("text", "image", "word", "reading")
CELL = 28  # pixels per character: one merged 2x2 patch of Qwen2.5-VL's 14-pixel patches
TEXT_QUESTIONS = ["What is {}?", "Compute {}.", "Add up {}.", "{} = ?", "Find the sum {}."]
IMAGE_QUESTION = "What is the value of the expression in the image?"
READING_QUESTION = "Write out the expression in the image."
WORD_PROBLEMS = [
    "{name} has {0} apples, buys {1} more and is given {2} more. How many apples does {name} have now?",
    "There are {0} birds on a tree. {1} more land, then {2} more. How many birds are on the tree?",
    "{name} reads {0} pages on Monday, {1} on Tuesday and {2} on Wednesday. How many pages is that in all?",
    "A box holds {0} red, {1} blue and {2} green pens. How many pens are in the box?",
]
NAMES = ["Ann", "Tom", "Mia", "Raj", "Lea", "Sam"]


def expression(numbers: list[int]) -> str:
    return " + ".join(map(str, numbers))


def chain_of_thought(numbers: list[int]) -> str:
    steps, total = [expression(numbers)], numbers[0]
    for n in numbers[1:]:
        steps.append(f"{total} + {n} = {total + n}")
        total += n
    return "\n".join(steps)


def draw_expression(numbers: list[int], path: str) -> None:
    """The expression in black on white, one character per 28x28 cell (digits, spaces dropped)."""
    from PIL import Image, ImageDraw, ImageFont

    text = expression(numbers).replace(" ", "")
    font = ImageFont.load_default(size=22)
    image = Image.new("RGB", (CELL * len(text), CELL), "white")
    draw = ImageDraw.Draw(image)
    for i, char in enumerate(text):
        left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
        draw.text((CELL * i + (CELL - right + left) / 2 - left, (CELL - bottom + top) / 2 - top), char, font=font,
                  fill="black")
    image.save(path)


def sum_records(n: int, seed: int, form: str, out_dir: str, prefix: str, terms: int = 3) -> list[Record]:
    """n questions of one form; images are written to out_dir/images/ and named relative to out_dir
    (where the records file goes). The target is the reasoning and answer; "reading" answers with the
    expression and has no reasoning."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")
    rng = random.Random(f"{seed}-{form}")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for i in range(n):
        numbers = [rng.randint(1, 9) for _ in range(terms)]
        record_id, answer, think = f"{prefix}{i}", str(sum(numbers)), chain_of_thought(numbers)
        if form in ("image", "reading"):
            image = os.path.join("images", f"{record_id}.png")
            draw_expression(numbers, os.path.join(out_dir, image))
            question = IMAGE_QUESTION if form == "image" else READING_QUESTION
            content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
        elif form == "text":
            content = rng.choice(TEXT_QUESTIONS).format(expression(numbers))
        else:
            content = rng.choice(WORD_PROBLEMS).format(*numbers, name=rng.choice(NAMES))
        messages = [{"role": "user", "content": content}]
        if form == "reading":
            answer, think = expression(numbers), None
        records.append(Record(id=record_id, messages=messages, answer=answer, target_think=think,
                              target_answer=answer, meta={"form": form, "numbers": numbers}))
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
