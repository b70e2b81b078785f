"""Math responses graded per second (math-verify in worker processes) at the default worker count."""
import random
import time

from _report import print_table

from data.grading import GradingPool, grade_many


def responses(n: int, seed: int = 0):
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        a, b = rng.randint(1, 50), rng.randint(2, 9)
        form = i % 4
        if form == 0:
            pairs.append((f"<think>...</think><answer>\\frac{{{a}}}{{{b}}}</answer>", f"{a}/{b}"))
        elif form == 1:
            pairs.append((f"so the answer is \\boxed{{{a / b:.6f}}}", f"\\frac{{{a}}}{{{b}}}"))
        elif form == 2:
            pairs.append((f"<answer>[{a}, {a + b})</answer>", f"[{a},{a + b})"))
        else:
            pairs.append((f"<answer>{a}\\sqrt{{{b}}}</answer>", f"\\sqrt{{{a * a * b}}}"))
    return pairs


if __name__ == "__main__":
    pairs = responses(2000)
    workers = GradingPool().workers
    grade_many(*zip(*pairs[:8]))  # start the workers (process start-up is not grading time)
    start = time.perf_counter()
    scores = grade_many([r for r, _ in pairs], [g for _, g in pairs])
    elapsed = time.perf_counter() - start
    print_table("bench/grading.py: math-verify grading throughput", [{
        "responses": len(pairs), "workers": workers, "seconds": elapsed, "graded_per_s": len(pairs) / elapsed,
        "fraction_correct": sum(scores) / len(scores)}])
