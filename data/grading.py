"""Answer extraction and grading: the one source of truth for every stage's correctness and reward.

Choice items are graded by option label in-process (math-verify cannot read bare letters), and by value
where an answer gives a number or a formula. Math items are graded by math-verify equivalence in worker
processes with a hard time limit per item: math-verify's own timeouts use signal.alarm (no good in
threads, and blind to a long computation inside C code), so a worker that overruns is killed and the
item scores 0.

The rule for choice answers (docs/data.md gives it with examples):
- an answer is a label (B, (B), B., B:, B), B - ..., Option B, **B**, "Answer: B", "The answer is (B)"), an
  option's exact text (up to case where that picks one option), or a value equal to exactly one option's;
- a label with text after it is that option unless the text names another option (that option's text, or
  its value and not the label's): then label and text disagree, and the answer is wrong whatever the
  separator. After "B." or "B " (which also begin sentences: "C. difficile", "A patient") the text must
  name B for the B to be a label at all;
- an answer that names two different options ("(A) or (C)") is wrong.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from multiprocessing.connection import wait
from typing import NamedTuple

DEFAULT_TIMEOUT = 5.0  # seconds a math item may take before its worker is killed and it scores 0
MAX_ANSWER_CHARS = 1000  # an extracted answer longer than this is not an answer; it scores 0 unparsed
_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "math_worker.py")

_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.S)
_ANSWER_IS = re.compile(r"answer is\s*:?\s*([^\n]+)", re.I)
_LATEX_WRAPPERS = re.compile(r"\\(?:boxed|text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
# A label before text: strong where the separator cannot begin a sentence ("(B) ...", "B) ...", "B: ...", "B - ...",
# "Option B ..."), weak after "B." or "B " ("C. difficile", "A patient ..." are not answers C and A).
_STRONG_LABEL = re.compile(r"^(?:(?i:option|choice)\s+\(?([A-Za-z])\)?(?![A-Za-z])[.:)]?|\(([A-Za-z])\)|\[([A-Za-z])\]|"
                           r"([A-Z])\s*(?:[:)]|\s[-\u2013\u2014](?=\s)))\s*")
_WEAK_LABEL = re.compile(r"^([A-Z])(?:\.|(?=\s))\s*")
# words before a label: "Answer: B", "The correct option is (B)", "Final answer - B"
_LEAD_IN = re.compile(r"^(?:the\s+)?(?:final\s+|correct\s+|right\s+|best\s+)?(?:answer|option|choice)s?"
                      r"(?:\s+is)?\s*[:\-]?\s*(?=\S)", re.I)
# labels wherever they stand, for answers that name two options ("(A) or (C)", "A: 97; or C: 107")
_LABEL_ANYWHERE = re.compile(r"\(([A-Za-z])\)|(?i:\boption)\s+([A-Za-z])(?![A-Za-z])|(?<![A-Za-z])([A-Z])\s*[:)]")
_MATHEMATICAL = re.compile(r"\d|\\[A-Za-z]")
# a number, optionally after "x =" and before a unit: the forms a stated precision applies to
_NUMBER_IN_FORM = re.compile(r"^(?:[A-Za-z](?:_\{?\w+\}?)?\s*=\s*)?([-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+))\s*"
                             r"(?:[A-Za-z]{1,5}(?:\^\{?\d\}?)?|\^\{?\\circ\}?|\\circ|°|\\?%)?$")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} with balanced braces (None if absent or unbalanced)."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1: j].strip()
    return None


def extract_answer(response: str | None) -> str | None:
    """The final answer in a response: the last <answer>...</answer>, else the last \\boxed{}, else
    the last "the answer is ..."; None if there is none."""
    if not response:
        return None
    tags = _ANSWER_TAG.findall(response)
    if tags and tags[-1].strip():
        return tags[-1].strip()
    boxed = last_boxed(response)
    if boxed:
        return boxed
    matches = _ANSWER_IS.findall(response)
    if matches:
        answer = matches[-1].strip().rstrip(".").strip()
        return answer or None
    return None


def normalise_answer(text: str) -> str:
    """A canonical string for quick equality checks and vote counting (\\text{084} and 084 are one)."""
    text = _unwrapped(text)
    text = text.replace("\\left", "").replace("\\right", "").replace("\\!", "")
    return re.sub(r"\s+", "", text).rstrip(".")


def _unwrapped(text: str) -> str:
    """text without the LaTeX wrappers and dollar signs an answer or an option may come in."""
    for _ in range(3):  # \boxed{\text{B}} and the like
        text = _LATEX_WRAPPERS.sub(r"\1", text).strip().strip("$").strip()
    return text


def _option_form(text: str) -> str:
    """The form in which predictions and option texts are compared: unwrapped, spaces collapsed, no final
    period (20 of 198 GPQA options end in one)."""
    return " ".join(_unwrapped(text).split()).rstrip(".").strip()


def _the_one(letters) -> str | None:
    letters = set(letters)
    return letters.pop() if len(letters) == 1 else None


class Reading(NamedTuple):
    """How a choice answer reads before any value is compared. letter and no value: that option. No letter and no
    value: no option. A value: text to compare with the options' values, said after letter (or with no label);
    strong: the label stands if the value names no option (weak labels need their own option named)."""
    letter: str | None
    value: str | None = None
    strong: bool = False


def read_choice(prediction: str, options: dict[str, str]) -> Reading:
    """The module's rule for choice answers, up to the comparison of values (resolve_choice)."""
    text = _option_form(prediction)
    forms = {letter: _option_form(str(option)) for letter, option in options.items()}
    label = _label(text) or _label(_LEAD_IN.sub("", text))
    if label and not label[1] and label[0] in options:  # a label alone; it wins over option texts that are letters
        return Reading(label[0])
    exact = _the_one(letter for letter, form in forms.items() if form == text) or \
        _the_one(letter for letter, form in forms.items() if form.casefold() == text.casefold())
    if exact:
        return Reading(exact)
    if len(_labels_named(text, forms)) > 1:  # a hedge: two options named
        return Reading(None)
    if label and label[0] in options:
        letter, said, strong = label
        said = _option_form(said)
        named = [other for other, form in forms.items() if form and form.casefold() == said.casefold()]
        if named:  # the text is an option's: the label's own, or another's (they disagree)
            return Reading(letter if letter in named else None)
        own = forms[letter].casefold()
        if own and (said.casefold().startswith((own + " ", own + ",")) or (own.startswith(said.casefold())
                                                                           and len(said) >= 3)):
            return Reading(letter)
        if looks_mathematical(said):
            return Reading(letter, said, strong)
        return Reading(letter if strong else None)
    return Reading(None, text) if looks_mathematical(text) else Reading(None)


def _label(text: str) -> tuple[str, str, bool] | None:
    """A label at the start of text: (letter, the text after it, strong), or None."""
    text = text.replace("**", "").replace("__", "").strip()
    if len(text) == 1 and text.isalpha():
        return text.upper(), "", True
    for pattern, strong in ((_STRONG_LABEL, True), (_WEAK_LABEL, False)):
        match = pattern.match(text)
        if match:
            return next(g for g in match.groups() if g).upper(), text[match.end():].strip(), strong
    return None


def _labels_named(text: str, forms: dict[str, str]) -> set[str]:
    """The option labels an answer names anywhere, outside the options' own texts (which may hold labels)."""
    for form in sorted(forms.values(), key=len, reverse=True):
        if len(form) > 1:
            text = re.sub(re.escape(form), " ", text, flags=re.I)
    return {next(g for g in m.groups() if g).upper() for m in _LABEL_ANYWHERE.finditer(text)} & set(forms)


def resolve_choice(reading: Reading, equal: set[str]) -> str | None:
    """The option a reading answers, given the options whose value equals its value (empty when it has none)."""
    if reading.value is None or reading.letter is None:
        return reading.letter if reading.value is None else _the_one(equal)
    if reading.letter in equal or not equal:
        return reading.letter if reading.letter in equal or reading.strong else None
    return None  # the value names another option: label and value disagree


def choice_letter(prediction: str, options: dict[str, str]) -> str | None:
    """The option a prediction names without comparing values (majority votes group answers by it), or None."""
    reading = read_choice(prediction, options)
    return reading.letter if reading.value is None or reading.strong else None


def looks_mathematical(text: str) -> bool:
    """Holds a digit or a LaTeX command: an option whose value, not only its text, can be answered."""
    return bool(_MATHEMATICAL.search(text))


def grade_at_precision(prediction: str, answer: str, decimals: int) -> float | None:
    """1.0/0.0 for a number graded at a stated precision (MathVista's `precision`: the prediction rounded
    to that many decimals), in any of its forms (`\\boxed{1.24}`, `x = 1.21`, `1.21 cm`); None when either
    side is not a number."""
    number = _NUMBER_IN_FORM.match(" ".join(_unwrapped(prediction).split()))
    try:
        predicted, gold = float(number.group(1).replace(",", "")) if number else None, float(answer)
    except ValueError:
        return None
    if predicted is None:
        return None
    return float(round(predicted, decimals) == round(gold, decimals))


class GradingPool:
    """Worker processes (data/math_worker.py) that grade math answers, each item under a hard time limit.

    Workers start when the pool is made (call it early: each spends seconds importing math-verify, which
    can overlap with loading a model) and are waited for at the first grade."""

    def __init__(self, workers: int | None = None, timeout: float = DEFAULT_TIMEOUT):
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.timeout = timeout
        self._slots: list = [self._start() for _ in range(self.workers)]
        self._ready: set[int] = set()  # slots whose worker has said "ready"

    def _start(self) -> subprocess.Popen:
        # A plain script, not multiprocessing: a spawned child would re-import the caller's __main__.
        return subprocess.Popen([sys.executable, _WORKER, str(self.timeout)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, bufsize=1)

    def _worker(self, slot: int) -> subprocess.Popen:
        """The slot's worker, started if it was killed, once it has said it is ready."""
        if self._slots[slot] is None:
            self._slots[slot] = self._start()
        process = self._slots[slot]
        if slot not in self._ready:
            if not wait([process.stdout], 120) or process.stdout.readline().strip() != "ready":
                self._kill(slot)
                raise RuntimeError(f"a grading worker ({_WORKER}) failed to start")
            self._ready.add(slot)
        return process

    def _kill(self, slot: int):
        process = self._slots[slot]
        process.kill()
        process.wait()
        process.stdin.close()
        process.stdout.close()
        self._slots[slot] = None
        self._ready.discard(slot)

    def grade(self, pairs: list[tuple[str, str]], items: list | None = None) -> list[float]:
        """Scores (1.0/0.0) for (prediction, gold answer) pairs, in order. items[j] names the item pair j grades
        (default: each its own): an item's pairs share one time limit from the start of its first, so an answer
        compared with twelve options costs at most one limit, not twelve."""
        items = items if items is not None else list(range(len(pairs)))
        scores = [0.0] * len(pairs)
        pending = deque(range(len(pairs)))
        deadlines: dict = {}  # item -> when its time is up
        busy: dict[int, tuple[int, float]] = {}  # slot -> (pair index, deadline)
        while pending or busy:
            for slot in range(self.workers):
                while slot not in busy and pending:
                    index = pending.popleft()
                    deadline = deadlines.setdefault(items[index], time.monotonic() + self.timeout)
                    if time.monotonic() >= deadline:
                        continue  # the item's time is up: this pair scores 0 unrun
                    process = self._worker(slot)
                    process.stdin.write(json.dumps([index, *pairs[index]]) + "\n")
                    process.stdin.flush()
                    busy[slot] = (index, deadline)
            if not busy:
                continue
            by_pipe = {self._slots[slot].stdout: slot for slot in busy}
            next_deadline = min(deadline for _, deadline in busy.values())
            for pipe in wait(list(by_pipe), timeout=max(0.0, next_deadline - time.monotonic())):
                slot = by_pipe[pipe]
                line = pipe.readline()
                if line:
                    index, score = json.loads(line)
                    scores[index] = score
                else:  # the worker died: the pair scores 0
                    self._kill(slot)
                del busy[slot]
            now = time.monotonic()
            for slot, (index, deadline) in list(busy.items()):
                if now >= deadline:
                    self._kill(slot)
                    del busy[slot]
        return scores

    def close(self):
        for slot, process in enumerate(self._slots):
            if process is not None:
                self._kill(slot)


_pools: dict[tuple[int | None, float], GradingPool] = {}


def start_grading_workers(workers: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> GradingPool:
    """The shared pool grade_many uses for these settings, started now if it is not running yet."""
    key = (workers, timeout)
    if key not in _pools:
        _pools[key] = GradingPool(workers, timeout)
    return _pools[key]


@atexit.register
def _close_pools():
    for pool in _pools.values():
        pool.close()


def grade_many(responses: list[str | None], answers: list, options: list[dict | None] | None = None,
               workers: int | None = None, timeout: float = DEFAULT_TIMEOUT,
               precisions: list[int | None] | None = None) -> list[float]:
    """Grade many responses at once: choice items in-process, math items in parallel workers.

    An answer may be a list of alternatives, any one of which is correct (MMMU's list golds).
    precisions: per item, the decimals at which a numeric answer is graded (MathVista), or None."""
    options = options if options is not None else [None] * len(responses)
    precisions = precisions if precisions is not None else [None] * len(responses)
    scores = [0.0] * len(responses)
    math_jobs, math_slots = [], []  # (prediction, gold) pairs for the workers; (item, option letter or None)
    readings: dict[int, Reading] = {}  # choice answers whose value is compared with the options'
    for i, (response, answer, opts, decimals) in enumerate(zip(responses, answers, options, precisions)):
        prediction = extract_answer(response)
        if prediction is None:
            continue
        if opts:  # the label is read before any length limit: "B: <a long option text>" is still B
            reading = read_choice(prediction, opts)
            valued = [letter for letter, option in opts.items() if looks_mathematical(str(option))]
            if reading.value is None or len(reading.value) > MAX_ANSWER_CHARS or not valued:
                scores[i] = float(resolve_choice(reading, set()) == answer.strip().upper())
                continue
            # "24" for the option "$2 \cdot 4 \cdot 3$": resolved below by the options its value equals
            readings[i] = reading
            for letter in valued:
                math_jobs.append((reading.value, _option_form(str(opts[letter]))))
                math_slots.append((i, letter))
            continue
        if len(prediction) > MAX_ANSWER_CHARS:
            continue
        for gold in answer if isinstance(answer, list) else [answer]:
            if scores[i] == 1.0:  # an earlier alternative already matched
                break
            at_precision = grade_at_precision(prediction, gold, decimals) if decimals is not None else None
            if at_precision is not None:
                scores[i] = max(scores[i], at_precision)
            elif normalise_answer(prediction) == normalise_answer(gold):
                scores[i] = 1.0
            else:
                math_jobs.append((prediction, gold))
                math_slots.append((i, None))
    if math_jobs:
        equal: dict[int, set[str]] = {i: set() for i in readings}
        pool = start_grading_workers(workers, timeout)
        for (i, letter), score in zip(math_slots, pool.grade(math_jobs, [i for i, _ in math_slots])):
            if letter is None:
                scores[i] = max(scores[i], score)
            elif score == 1.0:
                equal[i].add(letter)
        for i, letters in equal.items():
            scores[i] = float(resolve_choice(readings[i], letters) == answers[i].strip().upper())
    return scores


def damaged_gold(answer) -> bool:
    """A gold answer that no prediction can match as intended: it holds a control character, the trace of
    a LaTeX command whose backslash was read as a JSON escape (MathVision's "\\x0crac{36}{13}" for
    "\\frac{36}{13}"; likewise \\b, \\t, \\r, \\n in "\\beta", "\\times", "\\right", "\\neq")."""
    return any(any(ord(c) < 32 for c in gold) for gold in (answer if isinstance(answer, list) else [answer]))


def grade(response: str | None, answer: str, options: dict[str, str] | None = None) -> float:
    """1.0 if the response's final answer is the gold answer, else 0.0 (never raises on bad responses).

    With `options` (letter -> text) the item is multiple choice and `answer` is its letter."""
    return grade_many([response], [answer], [options])[0]
