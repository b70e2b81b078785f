"""SFT tokens/s on CPU for the tiny model at two token budgets per micro-batch, on a long-tailed
(OpenThoughts-like, log-normal) length distribution. Each micro-batch is one packed row: under SDPA
(CPU, or a GPU without flash-attention) attention costs the square of the row's length, so a smaller
budget is faster here; flash-attention 2's varlen kernels cost the sum of each sequence's square."""
import json
import os
import random
import subprocess
import sys
import tempfile

from _report import print_table

from data.records import Record
from tiny_models import build_qwen2, build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH, MAX_LEN = 6, 16, 2048


def long_tailed_data(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            words = min(int(rng.lognormvariate(4.6, 0.9)), 1500)  # median ~100 words, a long tail
            think = " ".join(f"w{rng.randint(0, 99)}" for _ in range(words))
            fh.write(json.dumps(Record(id=str(i), messages=[{"role": "user", "content": f"Question {i}?"}],
                                       answer="1", target_think=think, target_answer="1").to_json()) + "\n")


def run(model: str, data: str, out: str, budget: int) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "sft.py"), "--model", model, "--data", data, "--output-dir", out,
           "--global-batch-size", str(BATCH), "--max-tokens-per-micro-batch", str(budget), "--max-length",
           str(MAX_LEN), "--max-steps", str(STEPS), "--save-every", "0", "--no-activation-checkpointing"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh][1:]  # the first step includes warm-up
    return {"tokens per micro-batch": budget, "tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows),
            "s_per_step": sum(r["seconds"] for r in rows) / len(rows),
            "peak_memory_gib": max(r["peak_memory_gib"] for r in rows)}


if __name__ == "__main__":
    work = tempfile.mkdtemp()
    tok = build_tokenizer(f"{work}/tok")
    model = build_qwen2(f"{work}/model", tok)
    data = f"{work}/data.jsonl"
    long_tailed_data(data, STEPS * BATCH)
    rows = [run(model, data, f"{work}/{budget}", budget) for budget in (2048, 8192)]
    print_table(f"bench/sft_throughput.py: tiny Qwen2, {BATCH} seqs/step, max length {MAX_LEN}", rows)
