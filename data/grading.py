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
_LETTER = re.compile(r"^(?i:option\s+)?\(?([A-Z])\)?(?=$|[\s.:)\]])")
_BARE_LABEL = re.compile(r"^(?i:option\s+)?\(?([A-Z])\)?[.:]?$")


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


def _plain(text: str) -> str:
    return " ".join(text.split()).lower().rstrip(".").strip()


def choice_letter(prediction: str, options: dict[str, str]) -> str | None:
    """The option a prediction names. A bare label (`B`, `(B)`, `B.`, `Option B`, `\\boxed{B}`) wins, since
    option texts can themselves be letters (MedXpertQA, MMMU-Pro); then the exact text of an option; then
    a label followed by text (`B: No`, `C. Herpes ...`)."""
    text = prediction.strip()
    for _ in range(3):  # \boxed{\text{B}} and the like
        text = _LATEX_WRAPPERS.sub(r"\1", text).strip().strip("$").strip()
    bare = _BARE_LABEL.match(text if len(text) > 1 else text.upper())
    if bare and bare.group(1) in options:
        return bare.group(1)
    by_text = {_plain(v): k for k, v in options.items()}
    if _plain(text) in by_text:
        return by_text[_plain(text)]
    match = _LETTER.match(text)
    if match and match.group(1) in options:
        return match.group(1)
    return None


def grade_choice(prediction: str | None, answer: str, options: dict[str, str]) -> float:
    if prediction is None:
        return 0.0
    return float(choice_letter(prediction, options) == answer.strip().upper())


def grade_at_precision(prediction: str, answer: str, decimals: int) -> float | None:
    """1.0/0.0 for a number graded at a stated precision (MathVista's `precision`: the prediction rounded
    to that many decimals); None when either side is not a plain number."""
    try:
        predicted, gold = float(prediction.replace(",", "").strip().strip("$")), float(answer)
    except ValueError:
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
    math_jobs, math_slots = [], []
    for i, (response, answer, opts, decimals) in enumerate(zip(responses, answers, options, precisions)):
        prediction = extract_answer(response)
        if prediction is None:
            continue
        if opts:  # the label is read before any length limit: "B: <a long option text>" is still B
            scores[i] = grade_choice(prediction, answer, opts)
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
                math_slots.append(i)
    if math_jobs:
        for i, score in zip(math_slots, start_grading_workers(workers, timeout).grade(math_jobs)):
            scores[i] = max(scores[i], score)
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
