"""SFT speed at the default flags, against a plain padded loop, in one run on the same model and data.

Workload: 256 examples with long-tailed (log-normal, OpenThoughts-like) lengths of at most 1,024 tokens,
32 per optimizer step, one epoch (8 steps), the tiny Qwen2 in fp32 on this machine. `sft.py` runs as a
user would: only the workload's flags, every speed setting (layout, activation checkpointing, token
budget) at its default. The plain loop is what a straightforward trainer does: micro-batches of 4
sequences (the paper's per-GPU batch) in data order, right-padded to the longest with an attention mask,
the full [batch, length, vocabulary] log-softmax, AdamW. Both see the same token ids and labels
(sft.tokenize) in the same order (training.step_indices), and both report the loop's wall time alone
(no loading, no saving). Per-step times exclude the first step, the warm-up, on both sides."""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from _report import print_table

from data.records import Record
from tiny_models import build_qwen2, build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES, BATCH, MAX_LEN, PLAIN_MICRO_BATCH = 256, 32, 1024, 4


def long_tailed_data(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            words = min(int(rng.lognormvariate(3.6, 0.9)), 400)  # median ~200 tokens; ~3% cut at 1,024
            think = " ".join(f"w{rng.randint(0, 99)}" for _ in range(words))
            fh.write(json.dumps(Record(id=str(i), messages=[{"role": "user", "content": f"Question {i}?"}],
                                       answer="1", target_think=think, target_answer="1").to_json()) + "\n")


def workload_flags(model: str, data: str, out: str) -> list[str]:
    return ["--model", model, "--data", data, "--output-dir", out, "--global-batch-size", str(BATCH),
            "--max-length", str(MAX_LEN), "--epochs", "1", "--save-every", "0"]


def ours(model: str, data: str, out: str, extra: list[str]) -> dict:
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), *workload_flags(model, data, out), *extra],
                            cwd=ROOT, check=True, capture_output=True, text=True)
    layout = next(line for line in result.stdout.splitlines() if line.startswith("model:"))
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    tokens = [r["tokens_per_s"] * r["seconds"] for r in rows]
    return {"seconds": [r["seconds"] for r in rows], "tokens": sum(tokens),
            "computed": sum(t / (1 - r["padding_fraction"]) for t, r in zip(tokens, rows)),
            "setting": layout.split(", ", 1)[1]}


def plain_padded_loop(model_dir: str, data: str) -> dict:
    """The baseline: nothing here is tuned, and nothing is wasteful beyond padding and full logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sft
    from data import load_records
    from training import step_indices

    args = sft.parse_args(workload_flags(model_dir, data, "unused"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = sft.tokenize(load_records(data, style="train"), tokenizer, args)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas), weight_decay=0.0)
    steps, seconds, tokens, computed = len(examples) // BATCH, [], 0, 0
    for step in range(steps):
        start = time.perf_counter()
        batch = [examples[i] for i in step_indices(len(examples), BATCH, step, steps, args.seed)]
        targets = sum(sum(label != sft.IGNORE for label in e.labels) for e in batch)
        for first in range(0, BATCH, PLAIN_MICRO_BATCH):
            micro = batch[first:first + PLAIN_MICRO_BATCH]
            width = max(len(e.ids) for e in micro)
            ids = torch.tensor([e.ids + [0] * (width - len(e.ids)) for e in micro])
            mask = torch.tensor([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in micro])
            labels = torch.tensor([e.labels + [sft.IGNORE] * (width - len(e.labels)) for e in micro])
            computed += ids.numel()
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=sft.IGNORE,
                                                     reduction="sum") / targets
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        tokens += sum(len(e.ids) for e in batch)
    return {"seconds": seconds, "tokens": tokens, "computed": computed,
            "setting": f"padded rows of {PLAIN_MICRO_BATCH}, sdpa, full logits"}


def row(name: str, result: dict, baseline_s: float) -> dict:
    steady = result["seconds"][1:]
    loop = sum(result["seconds"])
    return {"trainer": name, "setting": result["setting"], "loop_s": loop, "s_per_step": sum(steady) / len(steady),
            "tokens_per_s": result["tokens"] / loop, "padding": 1 - result["tokens"] / result["computed"],
            "speedup": baseline_s / loop}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sft-flags", default="", help="extra sft.py flags for a second 'ours' row (e.g. a layout)")
    cli = parser.parse_args()
    work = tempfile.mkdtemp()
    tok = build_tokenizer(f"{work}/tok")
    model = build_qwen2(f"{work}/model", tok)
    data = f"{work}/data.jsonl"
    long_tailed_data(data, EXAMPLES)
    plain = plain_padded_loop(model, data)
    baseline = sum(plain["seconds"])
    rows = [row("plain padded loop", plain, baseline), row("sft.py, default flags", ours(model, data, f"{work}/ours", []),
                                                           baseline)]
    if cli.sft_flags:
        rows.append(row(f"sft.py {cli.sft_flags}", ours(model, data, f"{work}/flags", cli.sft_flags.split()), baseline))
    print_table(f"bench/sft_throughput.py: tiny Qwen2, {EXAMPLES} long-tailed examples (<= {MAX_LEN} tokens), "
                f"{BATCH} per step, 1 process", rows)
    print(f"tokens computed, padding included: {plain['computed']:,} by the plain loop, {plain['tokens']:,} in the "
          f"data: with no padding at the same cost per token, a loop would be "
          f"{plain['computed'] / plain['tokens']:.2f}x faster than the plain one")
