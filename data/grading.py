"""Answer extraction and grading: the one source of truth for every stage's correctness and reward.

Choice items are graded by option letter in-process (math-verify cannot read bare letters). Math
items are graded by math-verify equivalence in worker processes with a hard per-item time limit:
math-verify's own timeouts use signal.alarm (no good in threads, and blind to a long computation
inside C code), so a worker that overruns is killed and the item scores 0.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import re
import time
from collections import deque
from multiprocessing.connection import wait

DEFAULT_TIMEOUT = 5.0  # seconds a math item may take before its worker is killed and it scores 0
MAX_ANSWER_CHARS = 1000  # an extracted answer longer than this is not an answer; it scores 0 unparsed

_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.S)
_ANSWER_IS = re.compile(r"answer is\s*:?\s*([^\n]+)", re.I)
_LATEX_WRAPPERS = re.compile(r"\\(?:boxed|text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_LETTER = re.compile(r"^(?i:option\s+)?\(?([A-Z])\)?(?=$|[\s.:)\]])")


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


def choice_letter(prediction: str, options: dict[str, str]) -> str | None:
    """The option a prediction names: its exact option text, or a letter as `B`, `B.`, `(B)`, `B: text`."""
    text = prediction.strip()
    for _ in range(3):  # \boxed{\text{B}} and the like
        text = _LATEX_WRAPPERS.sub(r"\1", text).strip().strip("$").strip()
    by_text = {" ".join(v.split()).lower(): k for k, v in options.items()}
    if " ".join(text.split()).lower().rstrip(".") in by_text:
        return by_text[" ".join(text.split()).lower().rstrip(".")]
    match = _LETTER.match(text if len(text) > 1 else text.upper())
    if match and match.group(1) in options:
        return match.group(1)
    return None


def grade_choice(prediction: str | None, answer: str, options: dict[str, str]) -> float:
    if prediction is None:
        return 0.0
    return float(choice_letter(prediction, options) == answer.strip().upper())


def math_equivalent(prediction: str, answer: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """math-verify equivalence of two answer strings. Call it in a worker process (see GradingPool)."""
    from math_verify import parse, verify

    inner = max(1, int(timeout / 2.5))  # math-verify's own soft limits fire before the hard kill
    gold = parse("\\boxed{" + answer + "}", parsing_timeout=inner)
    pred = parse("\\boxed{" + prediction + "}", parsing_timeout=inner)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=inner))


def _worker_main(conn, timeout):
    import math_verify  # noqa: F401  (import before announcing readiness, so it does not count as grading time)

    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        index, prediction, answer = job
        try:
            score = float(math_equivalent(prediction, answer, timeout))
        except Exception:
            score = 0.0
        conn.send((index, score))


class GradingPool:
    """Worker processes that grade math answers, each item under a hard time limit."""

    def __init__(self, workers: int | None = None, timeout: float = DEFAULT_TIMEOUT):
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.timeout = timeout
        self._ctx = mp.get_context("spawn")  # never fork a process that holds torch threads or vLLM
        self._slots: list = [None] * self.workers

    def _start(self, slot: int):
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker_main, args=(child, self.timeout), daemon=True)
        process.start()
        child.close()
        if not parent.poll(120) or parent.recv() != "ready":
            process.kill()
            raise RuntimeError("a grading worker failed to start")
        self._slots[slot] = (process, parent)

    def _kill(self, slot: int):
        process, conn = self._slots[slot]
        process.kill()
        process.join()
        conn.close()
        self._slots[slot] = None

    def grade(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Scores (1.0/0.0) for (prediction, gold answer) pairs, in order."""
        scores = [0.0] * len(pairs)
        pending = deque(range(len(pairs)))
        busy: dict[int, tuple[int, float]] = {}  # slot -> (item index, deadline)
        while pending or busy:
            for slot in range(self.workers):
                if slot not in busy and pending:
                    if self._slots[slot] is None:
                        self._start(slot)
                    index = pending.popleft()
                    self._slots[slot][1].send((index, *pairs[index]))
                    busy[slot] = (index, time.monotonic() + self.timeout)
            by_conn = {self._slots[slot][1]: slot for slot in busy}
            next_deadline = min(deadline for _, deadline in busy.values())
            for conn in wait(list(by_conn), timeout=max(0.0, next_deadline - time.monotonic())):
                slot = by_conn[conn]
                try:
                    index, score = conn.recv()
                    scores[index] = score
                except (EOFError, OSError):  # the worker died: the item scores 0
                    self._kill(slot)
                del busy[slot]
            now = time.monotonic()
            for slot, (index, deadline) in list(busy.items()):
                if now >= deadline:
                    self._kill(slot)
                    del busy[slot]
        return scores

    def close(self):
        for slot, entry in enumerate(self._slots):
            if entry is not None:
                self._kill(slot)


_pools: dict[tuple[int | None, float], GradingPool] = {}


def _pool(workers: int | None, timeout: float) -> GradingPool:
    key = (workers, timeout)
    if key not in _pools:
        _pools[key] = GradingPool(workers, timeout)
    return _pools[key]


@atexit.register
def _close_pools():
    for pool in _pools.values():
        pool.close()


def grade_many(responses: list[str | None], answers: list[str], options: list[dict | None] | None = None,
               workers: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> list[float]:
    """Grade many responses at once: choice items in-process, math items in parallel workers."""
    options = options if options is not None else [None] * len(responses)
    scores = [0.0] * len(responses)
    math_jobs, math_slots = [], []
    for i, (response, answer, opts) in enumerate(zip(responses, answers, options)):
        prediction = extract_answer(response)
        if prediction is None or len(prediction) > MAX_ANSWER_CHARS:
            continue
        if opts:
            scores[i] = grade_choice(prediction, answer, opts)
        elif normalise_answer(prediction) == normalise_answer(answer):
            scores[i] = 1.0
        else:
            math_jobs.append((prediction, answer))
            math_slots.append(i)
    if math_jobs:
        for i, score in zip(math_slots, _pool(workers, timeout).grade(math_jobs)):
            scores[i] = score
    return scores


def grade(response: str | None, answer: str, options: dict[str, str] | None = None) -> float:
    """1.0 if the response's final answer is the gold answer, else 0.0 (never raises on bad responses).

    With `options` (letter -> text) the item is multiple choice and `answer` is its letter."""
    return grade_many([response], [answer], [options])[0]
