"""Answer extraction and grading: the one source of truth for every stage's correctness and reward.

Choice items are graded by option letter in-process (math-verify cannot read bare letters). Math
items are graded by math-verify equivalence in worker processes with a hard per-item time limit:
math-verify's own timeouts use signal.alarm (no good in threads, and blind to a long computation
inside C code), so a worker that overruns is killed and the item scores 0.
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

DEFAULT_TIMEOUT = 5.0  # seconds a math item may take before its worker is killed and it scores 0
MAX_ANSWER_CHARS = 1000  # an extracted answer longer than this is not an answer; it scores 0 unparsed
_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "math_worker.py")

_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.S)
_ANSWER_IS = re.compile(r"answer is\s*:?\s*([^\n]+)", re.I)
_LATEX_WRAPPERS = re.compile(r"\\(?:boxed|text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
# A label that cannot be a word of a sentence: "(B)", "B)", "B:", "Option B", "B" alone (then what follows
# is an explanation); "B." or "B " followed by text is a label only when that text is option B's own
# ("C. difficile toxin" and "A patient with ..." are not answers C and A).
_BARE_LABEL = re.compile(r"^(?i:option\s+)?\(?([A-Z])\)?[.:]?$")
_LABEL_THEN_ANYTHING = re.compile(r"^(?:(?i:option)\s+([A-Z])\b[.:)]?|\(([A-Z])\)|([A-Z])[:)])\s*")
_LABEL_THEN_TEXT = re.compile(r"^([A-Z])[.\s]\s*(.+)$", re.S)
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
    """A canonical string for quick equality checks and vote counting."""
    text = text.strip().strip("$").strip()
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


def _the_one(letters: list[str]) -> str | None:
    return letters[0] if len(set(letters)) == 1 else None


def choice_letter(prediction: str, options: dict[str, str]) -> str | None:
    """The option a prediction names, or None. A bare label (`B`, `(B)`, `B.`, `Option B`, `\\boxed{B}`)
    wins, since option texts can themselves be letters (MedXpertQA, MMMU-Pro); then an option's exact text,
    then its text up to case where that picks one option (genetics' `XAXa`, `XAXA`, `XaXa`); then a label
    before text (`B: No`, `(B) because`, and `C. Herpes ...` where that is option C's text)."""
    text = _option_form(prediction)
    bare = _BARE_LABEL.match(text if len(text) > 1 else text.upper())
    if bare and bare.group(1) in options:
        return bare.group(1)
    forms = {letter: _option_form(str(option)) for letter, option in options.items()}
    exact = _the_one([letter for letter, form in forms.items() if form == text])
    if exact:
        return exact
    folded = _the_one([letter for letter, form in forms.items() if form.casefold() == text.casefold()])
    if folded:
        return folded
    label = _LABEL_THEN_ANYTHING.match(text)
    if label:
        letter = next(g for g in label.groups() if g)
        return letter if letter in options else None
    label = _LABEL_THEN_TEXT.match(text)
    if label and label.group(1) in options:
        said, own = label.group(2).casefold(), forms[label.group(1)].casefold()
        if own and (said == own or said.startswith(own + " ") or said.startswith(own + ",")
                    or (own.startswith(said) and len(said) >= 3)):
            return label.group(1)
    return None


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

    def grade(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Scores (1.0/0.0) for (prediction, gold answer) pairs, in order."""
        scores = [0.0] * len(pairs)
        pending = deque(range(len(pairs)))
        busy: dict[int, tuple[int, float]] = {}  # slot -> (item index, deadline)
        while pending or busy:
            for slot in range(self.workers):
                if slot not in busy and pending:
                    process = self._worker(slot)
                    index = pending.popleft()
                    process.stdin.write(json.dumps([index, *pairs[index]]) + "\n")
                    process.stdin.flush()
                    busy[slot] = (index, time.monotonic() + self.timeout)
            by_pipe = {self._slots[slot].stdout: slot for slot in busy}
            next_deadline = min(deadline for _, deadline in busy.values())
            for pipe in wait(list(by_pipe), timeout=max(0.0, next_deadline - time.monotonic())):
                slot = by_pipe[pipe]
                line = pipe.readline()
                if line:
                    index, score = json.loads(line)
                    scores[index] = score
                else:  # the worker died: the item scores 0
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
    for i, (response, answer, opts, decimals) in enumerate(zip(responses, answers, options, precisions)):
        prediction = extract_answer(response)
        if prediction is None:
            continue
        if opts:  # the label is read before any length limit: "B: <a long option text>" is still B
            letter = choice_letter(prediction, opts)
            if letter is None and looks_mathematical(prediction) and len(prediction) <= MAX_ANSWER_CHARS:
                # "24" for the option "$2 \cdot 4 \cdot 3$": counted below if exactly one option equals it
                for letter, option in opts.items():
                    if looks_mathematical(str(option)):
                        math_jobs.append((prediction, _option_form(str(option))))
                        math_slots.append((i, letter))
            else:
                scores[i] = float(letter == answer.strip().upper())
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
        equal_options: dict[int, list[str]] = {}
        for (i, letter), score in zip(math_slots, start_grading_workers(workers, timeout).grade(math_jobs)):
            if letter is None:
                scores[i] = max(scores[i], score)
            elif score == 1.0:
                equal_options.setdefault(i, []).append(letter)
        for i, letters in equal_options.items():
            scores[i] = float(len(letters) == 1 and letters[0] == answers[i].strip().upper())
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
