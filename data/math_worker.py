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

# An equation counts as an answer only when its left side is one variable (x = 3 for gold 3):
# math-verify otherwise matches the right side of any equation (x^2 + 2py = 0 "equals" 0).
_ASSIGNMENT = re.compile(r"^\s*(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?\s*=(?!=)")
# A ratio ("2:1") is compared term by term: math-verify reads it as its first term alone.
_RATIO = re.compile(r"^[^:{}\\]+(?::[^:{}\\]+)+$")


def _parse(text: str, timeout: float) -> list:
    from math_verify import parse
    return parse("\\boxed{" + text + "}", parsing_timeout=max(1, int(timeout / 2.5)))


def _verify(prediction: str, answer: str, timeout: float) -> bool:
    from math_verify import verify

    gold, pred = _parse(answer, timeout), _parse(prediction, timeout)
    # math-verify's own soft limits fire before the parent's hard kill
    return bool(gold and pred and verify(gold, pred, timeout_seconds=max(1, int(timeout / 2.5))))


def math_equivalent(prediction: str, answer: str, timeout: float) -> bool:
    """math-verify equivalence of a predicted and a gold answer string."""
    if "=" in prediction and "=" not in answer and not _ASSIGNMENT.match(prediction):
        return False
    terms = lambda text: [t.strip() for t in text.split(":")] if _RATIO.match(text.strip()) else [text]  # noqa: E731
    predicted, gold = terms(prediction), terms(answer)
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
