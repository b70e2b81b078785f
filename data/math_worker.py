"""A math-grading worker process: `python data/math_worker.py TIMEOUT`, one JSON job per stdin line.

Started by data.grading.GradingPool as a plain script, never through multiprocessing: a spawned
multiprocessing child re-imports the caller's __main__, which fails from stdin, notebooks and scripts
without an `if __name__ == "__main__":` guard. This file imports nothing of the project, so it runs
the same whoever started it.

Protocol: it prints "ready" once math-verify is imported, then for each line [index, prediction, gold]
prints [index, score]. A job that overruns is the parent's to kill.
"""
from __future__ import annotations

import json
import re
import sys
from decimal import Decimal

# An equation counts as an answer only when its left side is one variable (x = 3 for gold 3):
# math-verify otherwise matches the right side of any equation (x^2 + 2py = 0 "equals" 0).
_ASSIGNMENT = re.compile(r"^\s*(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?\s*=(?!=)")
# A ratio ("2:1") is compared term by term, whatever wraps it (\boxed{4:1}, \text{4:1}, $4:1$): math-verify
# reads one as its first term alone, or as a quotient, so that "\frac{14}{3}:1" would equal "\frac{14}{3}".
_WRAPPED = re.compile(r"^\\(?:boxed|text|textbf|mathrm|mbox|displaystyle)\s*\{(.*)\}$", re.S)
_OPENING, _CLOSING = "{([", "})]"
# A lone number written in digit groups (58,500; 58\\,500; 58{,}500), after an optional "x =": math-verify reads
# the commas as a tuple's. A number with a percent sign, which math-verify reads as itself or a hundredth of it,
# but not when it is negative (-50\\% is neither -50 nor -0.5 there).
_ASSIGNED = re.compile(r"^((?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?\s*=\s*)?(.*)$", re.S)
_GROUPED = re.compile(r"^([-+]?)(\d{1,3}(?:(?:,|\\,|\{,\}|\\!|\\ )\d{3})+)(\.\d+)?$")
_PERCENT = re.compile(r"^([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*\\?%$")


def _parse(text: str, timeout: float) -> list:
    from math_verify import parse
    return parse("\\boxed{" + text + "}", parsing_timeout=max(1, int(timeout / 2.5)))


def _verify(prediction: str, answer: str, timeout: float) -> bool:
    from math_verify import verify

    gold, pred = _parse(answer, timeout), _parse(prediction, timeout)
    # math-verify's own soft limits fire before the parent's hard kill
    return bool(gold and pred and verify(gold, pred, timeout_seconds=max(1, int(timeout / 2.5))))


def _depths(text: str):
    depth = 0
    for char in text:
        depth += (char in _OPENING) - (char in _CLOSING)
        yield char, depth


def _unwrapped(text: str) -> str:
    """text without the dollar signs and whole-answer wrappers (\\boxed{...}, \\text{...}) around it."""
    while True:
        inner = text.strip().strip("$").strip()
        wrapped = _WRAPPED.match(inner)
        if wrapped and all(depth >= 0 for _, depth in _depths(wrapped.group(1))):
            inner = wrapped.group(1).strip()
        if inner == text:
            return text
        text = inner


def _ratio_terms(text: str) -> list[str] | None:
    """The terms of a ratio written with colons outside any brackets ("\\frac{14}{3}:1"), or None."""
    terms, start = [], 0
    for i, (char, depth) in enumerate(_depths(text)):
        if char == ":" and depth == 0:
            terms.append(text[start:i].strip())
            start = i + 1
    if not terms:
        return None
    terms.append(text[start:].strip())
    return terms if all(terms) else None


def _ungrouped(text: str) -> str:
    """A lone number's digit groups joined (58,500 -> 58500), keeping an "x =" before it."""
    head, number = _ASSIGNED.match(text.strip()).groups()
    grouped = _GROUPED.match(_unwrapped(number))
    if not grouped:
        return text
    return (head or "") + grouped.group(1) + re.sub(r"\D", "", grouped.group(2)) + (grouped.group(3) or "")


def _percent_values(text: str) -> list[str] | None:
    """A number with a percent sign as the two values it may stand for: itself and a hundredth of it."""
    percent = _PERCENT.match(_unwrapped(text))
    if not percent:
        return None
    return [percent.group(1), str(Decimal(percent.group(1)) / 100)]


def math_equivalent(prediction: str, answer: str, timeout: float) -> bool:
    """math-verify equivalence of a predicted and a gold answer string."""
    prediction, answer = _ungrouped(prediction), _ungrouped(answer)
    values = _percent_values(prediction) if _percent_values(answer) is None else None
    if values:
        return any(math_equivalent(value, answer, timeout) for value in values)
    if "=" in prediction and "=" not in answer and not _ASSIGNMENT.match(prediction):
        return False
    predicted = _ratio_terms(_unwrapped(prediction)) or [prediction]
    gold = _ratio_terms(_unwrapped(answer)) or [answer]
    return len(predicted) == len(gold) and all(_verify(p, g, timeout) for p, g in zip(predicted, gold))


def main() -> None:
    timeout = float(sys.argv[1])
    import math_verify  # noqa: F401  (before "ready", so the import never counts against an item's time)

    print("ready", flush=True)
    for line in sys.stdin:
        index, prediction, answer = json.loads(line)
        try:
            score = float(math_equivalent(prediction, answer, timeout))
        except Exception:
            score = 0.0
        print(json.dumps([index, score]), flush=True)


if __name__ == "__main__":
    main()
