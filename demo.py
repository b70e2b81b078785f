"""`make demo`: the whole X-Reasoner recipe in miniature, on a laptop CPU, in minutes.

A tiny Qwen2 model trained from random init on sums of three small numbers whose chain of thought is
written by a program. Every stage is the real script with its real flags:
  1. sft.py on the programmatic chain-of-thought traces;
  2. distill.py with the SFT model as teacher on fresh questions (rejection sampling);
  3. grpo.py from the SFT model, with vLLM-CPU rollouts;
  4. evaluate.py after each stage, with forced exit, on held-out sums of three and on sums of four, a
     longer form never trained on (transfer in miniature).
Everything goes to runs/demo/; the table at the end is also in runs/demo/results.md. The demo checks
its own claim: accuracy near 0 at random init, clearly higher after SFT, higher again after GRPO.
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
from data.synthetic import corpus, sums
from tiny_models import build_qwen2, build_tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))

FULL = dict(sft_examples=4096, sft_epochs=2, rl_prompts=1024, grpo_steps=40, eval_items=200, distill_questions=64,
            hidden=256, layers=4)
QUICK = dict(sft_examples=64, sft_epochs=1, rl_prompts=32, grpo_steps=2, eval_items=8, distill_questions=4,
             hidden=128, layers=2)


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
    print("\n".join(lines[-8:]))
    return time.time() - start


def evaluate(model: str, out: str, data_dir: str, name: str) -> dict:
    stage(f"evaluate ({name})", "evaluate.py", "--model", model, "--output-dir", out, "--benchmarks",
          f"records={data_dir}/heldout.jsonl,records={data_dir}/longer.jsonl",
          "--max-tokens", 64, "--answer-tokens", 16, "--max-model-len", 512)
    with open(f"{out}/heldout.summary.json") as fh:
        heldout = json.load(fh)
    with open(f"{out}/longer.summary.json") as fh:
        longer = json.load(fh)
    return {"stage": name, "heldout_accuracy": heldout["accuracy"], "longer_accuracy": longer["accuracy"],
            "forced_exit_rate": heldout["forced_exit_rate"], "mean_output_tokens": heldout["mean_output_tokens"]}


def main(argv=None):
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    out = os.path.abspath(args.output_dir)
    data_dir = os.path.join(out, "data")
    for name in ("data", "init", "sft", "grpo", "eval"):  # a rerun starts from scratch, not from the last run's state
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    for name in ("distilled.jsonl", "distilled.jsonl.progress", "distilled.jsonl.summary.json"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    os.makedirs(data_dir, exist_ok=True)
    start = time.time()

    # Data: disjoint seeds for training, RL, distillation and the two held-out forms.
    sft_data = sums(cfg["sft_examples"], args.seed, prefix="sft")
    write_records(f"{data_dir}/sft.jsonl", sft_data)
    write_records(f"{data_dir}/rl.jsonl", sums(cfg["rl_prompts"], args.seed + 1, prefix="rl"))
    write_records(f"{data_dir}/distill.jsonl", sums(cfg["distill_questions"], args.seed + 2, prefix="d"))
    write_records(f"{data_dir}/heldout.jsonl", sums(cfg["eval_items"], args.seed + 3, prefix="t"))
    write_records(f"{data_dir}/longer.jsonl", sums(cfg["eval_items"], args.seed + 4, terms=4, prefix="l"))

    # A model from random init, with a tokenizer trained here (no downloads).
    init = os.path.join(out, "init")
    tokenizer = build_tokenizer(init, corpus(sft_data[:512]), think_token=False)
    build_qwen2(init, tokenizer, hidden_size=cfg["hidden"], layers=cfg["layers"], seed=args.seed)
    rows = [evaluate(init, f"{out}/eval/init", data_dir, "random init")]

    stage("1. SFT on programmatic chain-of-thought traces", "sft.py", "--model", init, "--data", f"{data_dir}/sft.jsonl",
          "--output-dir", f"{out}/sft", "--epochs", cfg["sft_epochs"], "--lr", 2e-3, "--lr-decay", 0.5,
          "--warmup-steps", 10, "--global-batch-size", 32, "--max-tokens-per-micro-batch", 1024, "--max-length", 256,
          "--no-activation-checkpointing",
          "--save-every", 0, "--seed", args.seed)
    rows.append(evaluate(f"{out}/sft/model", f"{out}/eval/sft", data_dir, "after SFT"))

    stage("2. distillation: the SFT model as teacher, rejection sampling", "distill.py",
          "--teacher", f"{out}/sft/model", "--data", f"{data_dir}/distill.jsonl", "--output",
          f"{out}/distilled.jsonl", "--samples", 4, "--keep", 1, "--temperature", 1.0, "--top-k", -1,
          "--max-tokens", 64, "--max-model-len", 512, "--seed", args.seed)

    stage("3. GRPO from the SFT model, vLLM-CPU rollouts", "grpo.py", "--model", f"{out}/sft/model",
          "--data", f"{data_dir}/rl.jsonl", "--output-dir", f"{out}/grpo", "--global-batch-size", 16,
          "--group-size", 8, "--mini-batches", 2, "--max-tokens-per-micro-batch", 2048, "--max-response-length", 64,
          "--no-activation-checkpointing",
          "--lr", 3e-5, "--warmup-ratio", 0.05, "--kl-coef", 0.0, "--max-steps", cfg["grpo_steps"],
          "--save-every", 0, "--seed", args.seed)
    rows.append(evaluate(f"{out}/grpo/model", f"{out}/eval/grpo", data_dir, "after GRPO"))

    distilled = json.load(open(f"{out}/distilled.jsonl.summary.json"))
    table = ["| stage | held-out accuracy (3 terms) | longer sums (4 terms, never trained) | forced-exit rate | "
             "mean output tokens |", "|---|---|---|---|---|"]
    table += [f"| {r['stage']} | {r['heldout_accuracy']:.3f} | {r['longer_accuracy']:.3f} | "
              f"{r['forced_exit_rate']:.3f} | {r['mean_output_tokens']:.1f} |" for r in rows]
    table.append(f"\ndistillation acceptance rate: {distilled['acceptance_rate']:.3f} "
                 f"({distilled['kept']} of {distilled['samples']} samples kept)")
    table.append(f"total time: {time.time() - start:.0f} s")
    with open(f"{out}/results.md", "w") as fh:
        fh.write("\n".join(table) + "\n")
    with open(f"{out}/results.json", "w") as fh:
        json.dump({"stages": rows, "distillation": distilled}, fh, indent=2)
    print("\n" + "\n".join(table))

    if not args.quick:
        init_acc, sft_acc, grpo_acc = (r["heldout_accuracy"] for r in rows)
        if not (init_acc < 0.1 and sft_acc > init_acc + 0.2 and grpo_acc > sft_acc):
            raise SystemExit("demo: accuracy did not rise as the recipe says it should (see the table)")


if __name__ == "__main__":
    main()
