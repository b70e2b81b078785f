"""The paper's three prompt templates (App. C), verbatim, and the chat messages built from them."""
from __future__ import annotations

import re

TRAIN_TEMPLATE = (
    "You will solve a problem/request. You should provide your thoughts within <think> </think> tags "
    "before providing the answer.\nWrite your final answer within <answer> </answer> tags. "
    "Here is the question: {question}"
)

CHOICE_TEMPLATE = (
    "You should provide your thoughts within <think> </think> tags, then answer with just one of the "
    "options below within <answer> </answer> tags (For example, if the question is \n'Is the earth flat?"
    "\n A: Yes \nB: No', you should answer with <think>...</think> <answer>B: No </answer>). "
    "Here is the question: {question}"
)

MATH_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and you as the assistant solves "
    "it. You should first think about the reasoning process in the mind and then provide the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think><answer> the final answer as the "
    "option letter or the number depending on the question </answer> (For example, if the question is "
    "\n'Is the earth flat?\n A: Yes \nB: No', you should answer with <think> your reasoning </think> "
    "<answer>B: No</answer>. If the question is 'What is 1+1?', you should answer with <think> your "
    "reasoning </think> <answer>2 </answer>).\n\nHere is the question: {question}"
)

# "train": the training prompt (SFT, GRPO, distillation). "eval": the multiple-choice template for
# choice items and the math template for the rest, as in the paper's evaluations.
PROMPT_STYLES = ("train", "eval")


def format_options(options: dict[str, str]) -> str:
    return "\n".join(f"{letter}: {text}" for letter, text in options.items())


def options_in_question(question: str, options: dict[str, str]) -> bool:
    """Whether the question already lists its options as lines "A. ...", "(B) ...", "C: ..." (GPQA)."""
    return all(re.search(rf"(?m)^\s*\(?{re.escape(letter)}[.:)]", question) for letter in options)


def template(options: dict[str, str] | None, style: str) -> str:
    """The paper's template for a question: the training one, or in evaluation the choice or the math one."""
    if style == "train":
        return TRAIN_TEMPLATE
    if style == "eval":
        return CHOICE_TEMPLATE if options else MATH_TEMPLATE
    raise ValueError(f"unknown prompt style {style!r}; expected one of {PROMPT_STYLES}")


def prompt_text(question: str, options: dict[str, str] | None, style: str) -> str:
    text = template(options, style).format(question=question)
    if options and not options_in_question(question, options):
        text += "\nOptions:\n\n" + format_options(options)
    return text


def user_messages(question: str, options: dict[str, str] | None = None, style: str = "train",
                  images: list | None = None, image_labels: list[str] | None = None) -> list[dict]:
    """The user turn. With images, as on the X-Reasoner model card: the instruction first, then the
    images, then the question and its options. image_labels name the images where the text refers to
    them ("<image 3>"): each image is then preceded by its label."""
    if not images:
        return [{"role": "user", "content": prompt_text(question, options, style)}]
    instruction = template(options, style).format(question="")
    with_options = options and not options_in_question(question, options)
    body = question + ("\nOptions:\n\n" + format_options(options) if with_options else "")
    parts = [{"type": "text", "text": instruction}]
    for i, image in enumerate(images):
        if image_labels:
            parts.append({"type": "text", "text": f"\n{image_labels[i]}:"})
        parts.append({"type": "image", "image": image})
    parts.append({"type": "text", "text": body})
    return [{"role": "user", "content": parts}]


def readable(messages: list[dict]) -> str:
    """A chat's text for a log or a results file, each image as <image>."""
    return "\n".join(m["content"] if isinstance(m["content"], str) else
                     "".join(p["text"] if p.get("type") == "text" else "<image>" for p in m["content"])
                     for m in messages)


def image_refs(messages: list[dict]) -> list:
    """The images of a conversation as its messages hold them: file paths or PIL images."""
    return [part["image"] for message in messages if isinstance(message["content"], list)
            for part in message["content"] if part.get("type") == "image"]


def open_image(ref):
    """An image as a PIL image: records keep image files as paths until a stage reads them."""
    from PIL import Image
    return Image.open(ref).convert("RGB") if isinstance(ref, str) else ref


def assistant_target(think: str | None, answer: str) -> str:
    """The SFT target in the format the prompts ask for; think=None gives the non-CoT target."""
    if think is None:
        return f"<answer>{answer}</answer>"
    return f"<think>\n{think}\n</think>\n<answer>{answer}</answer>"
