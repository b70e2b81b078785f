"""Seconds from launching sft.py / grpo.py to their first optimizer step, on the demo's model size.

    python bench/startup.py [--repo DIR]

The first step is the moment the stage writes the first line of metrics.jsonl (after the step's
optimizer update). sft.py trains the demo-size model for one short epoch, and grpo.py starts from
that, so that its first rollout batch has answers to grade.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._report import print_table  # noqa: E402
from data import write_records  # noqa: E402
from data.synthetic import corpus, sum_records  # noqa: E402
from tiny_models import build_qwen2, build_tokenizer  # noqa: E402


def seconds_to_first_step(repo: str, script: str, args: list, out: str) -> tuple[float, dict]:
    metrics = os.path.join(out, "metrics.jsonl")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, os.path.join(repo, script), *map(str, args), "--output-dir", out],
                               cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while not (os.path.exists(metrics) and os.path.getsize(metrics)):
        if process.poll() is not None:
            raise SystemExit(f"{script} exited with {process.returncode} before its first step")
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    if process.wait() != 0:
        raise SystemExit(f"{script} failed (exit {process.returncode})")
    with open(metrics) as fh:
        return elapsed, json.loads(fh.readline())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="checkout whose stage scripts are timed (default: this one)")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="startup-")
    data = sum_records(1024, 0, "text", work, "s")
    write_records(f"{work}/data.jsonl", data)
    tokenizer = build_tokenizer(f"{work}/model", corpus(data), think_token=False)
    build_qwen2(f"{work}/model", tokenizer, hidden_size=256, layers=4)
    data_args = ["--data", f"{work}/data.jsonl", "--save-every", 0]
    rows = []
    # A short SFT first, so that GRPO's policy writes answers and its first step has math to grade.
    seconds, first = seconds_to_first_step(args.repo, "sft.py", data_args + [
        "--model", f"{work}/model", "--global-batch-size", 32, "--max-tokens-per-micro-batch", 1024, "--max-length", 256,
        "--no-activation-checkpointing",
        "--epochs", 1, "--lr", 2e-3, "--warmup-steps", 5], f"{work}/sft")
    rows.append({"stage": "sft.py", "launch to first step (s)": seconds, "first step (s)": first["seconds"],
                 "first step grading (s)": "-"})
    seconds, first = seconds_to_first_step(args.repo, "grpo.py", data_args + [
        "--model", f"{work}/sft/model", "--max-steps", 1,
        "--global-batch-size", 16, "--group-size", 8, "--mini-batches", 2, "--max-tokens-per-micro-batch", 2048,
        "--no-activation-checkpointing",
        "--max-response-length", 64, "--kl-coef", 0], f"{work}/grpo")
    rows.append({"stage": "grpo.py", "launch to first step (s)": seconds,
                 "first step (s)": sum(v for k, v in first.items() if k.startswith("seconds_")),
                 "first step grading (s)": first["seconds_grading"]})
    print_table(f"bench/startup.py: {args.repo}", rows)


if __name__ == "__main__":
    main()
