"""Grading: extraction, math equivalence, choice letters, missing and adversarial answers."""
import time

import pytest

from data.grading import DEFAULT_TIMEOUT, GradingPool, extract_answer, grade, grade_many

A = "<answer>{}</answer>".format
OPTS = {"A": "Yes", "B": "No", "C": "Herpes simplex encephalitis", "D": "None of the above"}

MATH_CASES = [
    # equivalent forms
    (A("0.5"), "\\frac{1}{2}", 1), (A("1/2"), "\\frac{1}{2}", 1), (A("\\dfrac12"), "\\frac{1}{2}", 1),
    (A("\\frac{1}{2}"), "0.5", 1), (A("\\tfrac{1}{2}"), "1/2", 1), (A("2/4"), "\\frac{1}{2}", 1),
    (A("0.50"), "1/2", 1), (A("\\frac{2}{3}"), "\\frac{1}{2}", 0), (A("0.3333"), "\\frac{1}{3}", 0),
    (A("10.0"), "10", 1), (A("1,000"), "1000", 1), (A("-3"), "-3", 1), (A("3"), "-3", 0),
    (A("\\sqrt{2}/2"), "\\frac{\\sqrt{2}}{2}", 1), (A("2\\sqrt{2}"), "\\sqrt{8}", 1), (A("\\pi"), "\\pi", 1),
    (A("x=3"), "3", 1), (A("3"), "4", 0), (A("42"), "42", 1), (A("$42$"), "42", 1), (A(" 7 "), "7", 1),
    # intervals and tuples
    (A("[1, 2)"), "[1,2)", 1), (A("(1,2)"), "(1, 2)", 1), (A("[1,2]"), "(1,2)", 0),
    (A("(0,1)\\cup(2,3)"), "(0, 1) \\cup (2, 3)", 1), (A("(-\\infty, 3]"), "(-\\infty,3]", 1),
    (A("(1, 2, 3)"), "(1,2,3)", 1), (A("(3, 2, 1)"), "(1,2,3)", 0), (A("\\{1,2\\}"), "\\{2,1\\}", 1),
    # units, \text{}, percentages
    (A("5\\text{ cm}"), "5", 1), (A("5 \\text{cm}"), "5", 1), (A("\\text{5}"), "5", 1),
    (A("50\\%"), "50", 1), (A("50\\%"), "0.5", 1), (A("50\\%"), "51", 0), (A("12^\\circ"), "12", 1),
    (A("\\$18.90"), "18.90", 1),
    # where the answer is found
    ("so it is \\boxed{7}.", "7", 1), ("\\boxed{1} then \\boxed{2}", "2", 1), ("The answer is 12.", "12", 1),
    ("<answer>3</answer> ... <answer>4</answer>", "4", 1), ("<think>maybe 5</think><answer>6", "6", 1),
    (A("\\boxed{\\frac{3}{4}}"), "0.75", 1), ("<think>\\boxed{9}</think><answer>8</answer>", "8", 1),
    # missing answers
    ("", "1", 0), (None, "1", 0), ("I do not know.", "1", 0), ("<answer></answer>", "1", 0), (A("banana"), "3", 0),
]

CHOICE_CASES = [
    (A("B"), "B", 1), (A("B."), "B", 1), (A("(B)"), "B", 1), (A("B: No"), "B", 1), (A("B: No "), "B", 1),
    (A("No"), "B", 1), (A("no"), "B", 1), (A("b"), "B", 1), (A("Option B"), "B", 1), (A("\\boxed{B}"), "B", 1),
    (A("\\boxed{\\text{B}}"), "B", 1), (A("C. Herpes Simplex encephalitis"), "C", 1),
    (A("Herpes Simplex Encephalitis"), "C", 1), (A("A"), "B", 0), (A("A: Yes"), "B", 0), (A("E"), "B", 0),
    (A("Yes"), "B", 0), ("The answer is (B).", "B", 1), ("\\boxed{D}", "D", 1), ("no answer here", "B", 0),
    (A("None of the above"), "D", 1), (A(""), "A", 0),
]


@pytest.mark.parametrize("response, gold, expected", MATH_CASES)
def test_math_grading(response, gold, expected):
    assert grade(response, gold) == expected


@pytest.mark.parametrize("response, gold, expected", CHOICE_CASES)
def test_choice_grading(response, gold, expected):
    assert grade(response, gold, OPTS) == expected


def test_there_are_at_least_60_graded_pairs():
    assert len(MATH_CASES) + len(CHOICE_CASES) >= 60


@pytest.mark.parametrize("response, expected", [
    ("<answer> 5 </answer>", "5"), ("x \\boxed{\\frac{1}{2}} y", "\\frac{1}{2}"),
    ("\\boxed{a{b}c}", "a{b}c"), ("\\boxed{unbalanced", None), ("The answer is: 12.", "12"),
    ("nothing", None), ("<answer>1</answer>\\boxed{2}", "1"),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


ADVERSARIAL = [
    A("9^{9^{9^{9}}}"), "\\boxed{9^{9^{9^{9}}}}", A("10^{10^{10^{10^{10}}}}!"), A("x" * 1_000_000),
    "x" * 1_000_000 + A("3"), A("\\frac{" * 500), A("}}}{{{" * 1000), A("(" * 2000 + "1"),
    "\\boxed{" * 5000, A("\\sqrt{" * 300 + "2" + "}" * 300),
]


def test_adversarial_answers_return_within_the_time_limit():
    start = time.monotonic()
    scores = grade_many(ADVERSARIAL, ["3"] * len(ADVERSARIAL))
    elapsed = time.monotonic() - start
    assert scores[4] == 1.0 and sum(scores) == 1.0
    # All items run in parallel workers, each killed at DEFAULT_TIMEOUT: never much more than a couple of limits.
    assert elapsed < 3 * DEFAULT_TIMEOUT + 10


def test_a_stuck_worker_is_killed_and_the_pool_keeps_working():
    pool = GradingPool(workers=1, timeout=1.0)
    try:
        start = time.monotonic()
        assert pool.grade([("9^{9^{9^{9}}}", "1"), ("2", "2"), ("0.5", "\\frac12")]) == [0.0, 1.0, 1.0]
        assert time.monotonic() - start < 15
    finally:
        pool.close()


def test_grade_many_matches_grade():
    responses = [A(str(i)) for i in range(10)] + [A("B")]
    golds = [str(i % 4) for i in range(10)] + ["B"]
    options = [None] * 10 + [OPTS]
    assert grade_many(responses, golds, options) == [grade(r, g, o) for r, g, o in zip(responses, golds, options)]
