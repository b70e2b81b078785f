"""Evaluate a model on the paper's benchmarks (§4), through vLLM (default) or transformers.

    python evaluate.py --model M --benchmarks gsm8k,mmlu_pro,mmmu=local/mmmu.parquet --output-dir O

Greedy decoding by default (the headline metric); `--temperature 0.3 --samples 5` gives mean
accuracy, majority-vote accuracy and pass@5 as in the paper's Figs. 3-4. Output is capped at
--max-tokens (4,096) with forced exit: `</think>` is forced after --max-tokens minus --answer-tokens
thinking tokens, so every response can still answer.

Outputs in --output-dir: run.json (provenance.py), BENCH.jsonl (one line per item: responses, extracted
answers, correctness, forced exit, tokens, finish reasons), BENCH.summary.json, results.md (every benchmark
of the directory with its 95% interval, beside the paper's numbers), and with --budgets the
accuracy-vs-budget table and plot. A rerun with the same --output-dir skips finished items; one with
another model or other decoding settings is refused, so that one directory never mixes two runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter

from data.benchmarks import (BENCHMARKS, OPTION_IN_IMAGE, PAPER_GREEDY, PAPER_MEAN_AT_5, PAPER_MODELS,
                             load_benchmark)
from data.grading import (choice_letter, damaged_gold, extract_answer, grade_many, normalise_answer,
                          start_grading_workers)
from data.prompts import image_refs, readable
from data.records import DataError, open_for_append, run_script, write_jsonl_line
from engine import ContextLengthError, context_length
from forced_exit import DEFAULT_EXIT_TEXT, count_forced

ANSWER_TOKENS = 256  # tokens left to answer after a forced exit (--answer-tokens)
MODEL_CARD_PIXELS = 512 * 512  # the X-Reasoner model card's min_pixels = max_pixels
# arguments that decide what an output directory's results mean: a rerun into it must keep them
RESULT_SETTINGS = ("model", "backend", "temperature", "samples", "top_p", "max_tokens", "answer_tokens",
                   "think_budget", "no_forced_exit", "exit_text", "budgets", "text_only_probe", "probe_temperature",
                   "max_pixels", "min_pixels", "seed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory or hub id")
    p.add_argument("--benchmarks", required=True,
                   help=f"comma-separated NAME (from the hub) or NAME=PATH (a local file); records=PATH is a file of "
                        f"this project's records, reported under its file name. Known: {', '.join(BENCHMARKS)}")
    p.add_argument("--output-dir", default="runs/eval", help="where results go (default: runs/eval)")
    p.add_argument("--backend", choices=["vllm", "hf"], default="vllm",
                   help="vllm (default) or hf (transformers' generate: slower, a reference for vLLM)")
    p.add_argument("--limit", type=int, help="evaluate the first N items of each benchmark")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip rows that cannot be read (counted and named in the summary; default: stop)")
    p.add_argument("--image-root",
                   help="folder that image paths are relative to (default: the data file's folder): PATH for "
                        "every benchmark, or NAME=PATH,... per benchmark (OmniMedVQA: the dataset root; "
                        "MedXpertQA: the unpacked image archive)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); the paper samples at 0.3")
    p.add_argument("--samples", type=int, default=1, help="responses per item (paper: 5 at temperature 0.3)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0: off)")
    p.add_argument("--max-tokens", type=int, default=4096, help="cap on output tokens per response (default 4096)")
    p.add_argument("--answer-tokens", type=int, default=ANSWER_TOKENS,
                   help=f"tokens left for the answer after a forced exit (default {ANSWER_TOKENS})")
    p.add_argument("--think-budget", type=int,
                   help="output tokens before </think> is forced (default: --max-tokens minus --answer-tokens)")
    p.add_argument("--no-forced-exit", action="store_true", help="never force the exit (the paper always does)")
    p.add_argument("--exit-text", default=DEFAULT_EXIT_TEXT, help="text forced at the budget (default </think>)")
    p.add_argument("--budgets", help="comma-separated thinking budgets: accuracy against budget (table and PNG)")
    p.add_argument("--text-only-probe", type=int, default=0, metavar="K",
                   help="answer each multimodal item K times without its images; items solved every time are "
                        "text-solvable and accuracy is also reported without them (paper: K=3)")
    p.add_argument("--probe-temperature", type=float, default=1.0, help="sampling temperature of the probe (1.0)")
    p.add_argument("--max-pixels", type=int, default=MODEL_CARD_PIXELS, help="image size cap (model card: 512x512)")
    p.add_argument("--min-pixels", type=int, default=MODEL_CARD_PIXELS, help="image size floor (model card: 512x512)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM tensor parallelism")
    p.add_argument("--max-model-len", type=int,
                   help="vLLM context length, prompt + output (default: 8,192, or the model's maximum if smaller)")
    p.add_argument("--chunk-size", type=int, default=256, help="items generated (and saved) per chunk")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model dir")
    args = p.parse_args(argv)
    if args.budgets and args.think_budget is not None:
        p.error("--budgets and --think-budget are exclusive")
    return args


# --- metrics (pure) --------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(extracted: list[str | None], correct: list[float], options: dict | None = None) -> float:
    """Correctness of the most frequent answer (ties: the one seen first); 0 when nothing was extracted."""
    keys = [None if a is None else (choice_letter(a, options) if options else None) or normalise_answer(a)
            for a in extracted]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return 0.0
    top = max(counts.values())
    winner = next(k for k in keys if k is not None and counts[k] == top)
    return correct[keys.index(winner)]


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def interval(per_item: list[float], z: float = 1.96) -> tuple[float, float]:
    """A 95% interval for the mean of per-item scores: Wilson's where every score is 0 or 1 (greedy accuracy,
    majority vote), else the normal one over items (mean accuracy of k samples, pass@k), clipped to [0, 1]."""
    n = len(per_item)
    if all(v in (0.0, 1.0) for v in per_item):
        return wilson(sum(per_item), n, z)
    mean = sum(per_item) / n
    half = z * math.sqrt(sum((v - mean) ** 2 for v in per_item) / (n - 1) / n) if n > 1 else 1.0
    return max(0.0, mean - half), min(1.0, mean + half)


def summarize(name: str, items: list[dict], samples: int) -> dict:
    summary = {"benchmark": name, "n": len(items)}
    if samples == 1:
        per_item = {"accuracy": [item["correct"][0] for item in items]}
    else:
        per_item = {"mean_acc": [_mean(i["correct"]) for i in items],
                    "majority_acc": [majority_vote(i["extracted"], i["correct"], i.get("options")) for i in items],
                    "pass_at_k": [pass_at_k(len(i["correct"]), int(sum(i["correct"])), samples) for i in items]}
    for metric, values in per_item.items():
        summary[metric] = _mean(values)
        summary[f"{metric}_interval"] = list(interval(values)) if values else [0.0, 1.0]
    if samples > 1:
        summary[f"pass_at_{samples}"] = summary["pass_at_k"]
    summary["forced_exit_rate"] = _mean([f for item in items for f in item["forced_exit"]])
    summary["mean_output_tokens"] = _mean([t for item in items for t in item["output_tokens"]])
    probed = [item for item in items if "text_solvable" in item]
    if probed:
        rest = [item for item in items if not item.get("text_solvable")]
        summary["n_text_solvable"] = len(items) - len(rest)
        summary["accuracy_without_text_solvable"] = _mean([_mean(i["correct"]) for i in rest])
    return summary


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


# --- generation backends ----------------------------------------------------------------------------

class VLLMBackend:
    """Generation through a vLLM engine: one made for this evaluation (start), or one a stage already runs
    (grpo.py's colocated engine scores held-out prompts through it)."""

    def __init__(self, llm, top_p: float = 1.0, seed: int = 0, max_pixels: int = MODEL_CARD_PIXELS,
                 min_pixels: int = MODEL_CARD_PIXELS, progress: bool = True):
        self.llm, self.tokenizer, self.progress = llm, llm.get_tokenizer(), progress
        self.top_p, self.seed, self.image_size = top_p, seed, {"max_pixels": max_pixels, "min_pixels": min_pixels}

    @classmethod
    def start(cls, args, exit_ids):
        from engine import make_llm
        images = {"limit_mm_per_prompt": {"image": 8}} if args.multimodal else {}
        llm = make_llm(args.model, max_model_len=args.max_model_len, seed=args.seed,
                       tensor_parallel_size=args.tensor_parallel_size,
                       exit_ids=None if args.no_forced_exit else exit_ids, trust_remote_code=args.trust_remote_code,
                       **images)
        return cls(llm, args.top_p, args.seed, args.max_pixels, args.min_pixels)

    def generate(self, conversations, n, temperature, max_tokens, extra_args):
        from engine import vllm_request
        from vllm import SamplingParams
        # a request's own seed makes sampling reproducible whatever the batch (greedy needs none)
        params = SamplingParams(n=n, temperature=temperature, top_p=self.top_p if temperature > 0 else 1.0,
                                max_tokens=max_tokens, seed=self.seed if temperature > 0 else None,
                                extra_args=extra_args)
        prompts = [vllm_request(self.tokenizer, conversation, self.image_size) for conversation in conversations]
        outputs = self.llm.generate(prompts, params, use_tqdm=self.progress)
        return [[(list(o.token_ids), o.finish_reason) for o in out.outputs] for out in outputs]

    def close(self):
        from engine import shutdown_llm
        shutdown_llm(self.llm)


class HFBackend:
    def __init__(self, args):
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer

        from engine import load_hf_model, on_gpu
        gpu = on_gpu()
        self.model = load_hf_model(args.model, trust_remote_code=args.trust_remote_code,
                                   dtype=torch.bfloat16 if gpu else torch.float32)
        self.model.to("cuda" if gpu else "cpu").eval()
        self.tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        has_processor = os.path.exists(os.path.join(args.model, "preprocessor_config.json"))
        self.image_processor = AutoImageProcessor.from_pretrained(args.model) if has_processor else None
        self.args = args

    def generate(self, conversations, n, temperature, max_tokens, extra_args):
        from engine import hf_generate
        results = [[] for _ in conversations]
        for sample in range(n):
            outs = hf_generate(self.model, self.tokenizer, self.image_processor, conversations,
                               max_new_tokens=max_tokens, temperature=temperature, budget=extra_args.get("think_budget"),
                               exit_ids=extra_args.get("think_exit_ids"), max_pixels=self.args.max_pixels,
                               min_pixels=self.args.min_pixels, seed=self.args.seed + sample)
            for i, out in enumerate(outs):
                results[i].append(out)
        return results

    def close(self):
        pass


# --- the protocol ------------------------------------------------------------------------------------

def without_images(messages):
    return [{**m, "content": m["content"] if isinstance(m["content"], str) else
             "".join(part["text"] for part in m["content"] if part.get("type") == "text")} for m in messages]


def run_items(backend, records, n, temperature, budget, max_tokens, exit_ids):
    """Generate and grade; one result dict per record."""
    extra = {} if budget is None else {"think_budget": budget, "think_exit_ids": exit_ids}
    generations = backend.generate([r.messages for r in records], n, temperature, max_tokens, extra)
    tokenizer = backend.tokenizer
    flat = [(r, ids, reason) for r, outs in zip(records, generations) for ids, reason in outs]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for _, ids, _ in flat]
    scores = grade_many(texts, [r.answer for r, _, _ in flat], [r.options for r, _, _ in flat],
                        precisions=[r.meta.get("precision") for r, _, _ in flat])
    items, position = [], 0
    for record, outs in zip(records, generations):
        span = range(position, position + len(outs))
        position += len(outs)
        items.append({
            "id": record.id, "prompt": readable(record.messages), "answer": record.answer,
            "options": record.options, "responses": [texts[j] for j in span],
            "extracted": [extract_answer(texts[j]) for j in span], "correct": [scores[j] for j in span],
            "forced_exit": [budget is not None and bool(count_forced(flat[j][1], budget, exit_ids,
                                                                     decode=tokenizer.decode)) for j in span],
            "output_tokens": [len(flat[j][1]) for j in span], "finish_reason": [flat[j][2] for j in span]})
    return items


def image_root(spec: str | None, name: str) -> str | None:
    """--image-root's folder for one benchmark: PATH (all of them) or NAME=PATH,..."""
    if not spec or "=" not in spec:
        return spec
    return dict(part.split("=", 1) for part in spec.split(",")).get(name)


def load_items(args, name, path, label) -> tuple[list, list | None, list]:
    """A benchmark's records, its skipped rows (None unless --skip-bad-rows) and the ids of damaged golds."""
    bad_rows = [] if args.skip_bad_rows else None
    records = load_benchmark(name, path, args.limit, image_root(args.image_root, name), bad_rows)
    for record in records:
        if record.answer is None:
            raise DataError(f"{label}: item {record.id}: no gold answer")
    if bad_rows and not records:
        raise DataError(f"{label}: all {len(bad_rows)} rows were skipped as unreadable; the first: {bad_rows[0]}")
    damaged = [r.id for r in records if r.kind == "math" and damaged_gold(r.answer)]
    if bad_rows or damaged:
        print(f"{label}: {len(bad_rows or [])} rows skipped, {len(damaged)} gold answers damaged (see the summary)")
    drawn = sum(bool(r.meta.get("options_in_image")) for r in records)
    if drawn:
        print(f"{label}: {drawn} items' options are pictures drawn in their one image (MathVision's <image2>...), "
              f"listed as {OPTION_IN_IMAGE!r}; counted in the summary")
    return records, bad_rows, damaged


def evaluate_benchmark(backend, args, records, bad_rows, damaged, label, out_dir, budget, max_tokens,
                       exit_ids) -> dict:
    results_path = os.path.join(out_dir, f"{label}.jsonl")
    done = {}
    if os.path.exists(results_path):
        with open(results_path) as fh:
            for line in fh:
                if line.strip():
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by an interrupted run: that item runs again
                    done[item["id"]] = item
    todo = [r for r in records if r.id not in done]
    print(f"{label}: {len(records)} items, {len(done)} already done")
    with open_for_append(results_path) as fh:
        for start in range(0, len(todo), args.chunk_size):
            chunk = todo[start:start + args.chunk_size]
            items = run_items(backend, chunk, args.samples, args.temperature, budget, max_tokens, exit_ids)
            if args.text_only_probe and any(image_refs(r.messages) for r in chunk):
                probe_records = [r.__class__(**{**r.__dict__, "messages": without_images(r.messages)}) for r in chunk]
                probes = run_items(backend, probe_records, args.text_only_probe, args.probe_temperature, budget,
                                   max_tokens, exit_ids)
                for item, probe in zip(items, probes):
                    item["text_only_correct"] = probe["correct"]
                    item["text_solvable"] = all(c == 1.0 for c in probe["correct"])
            for item in items:
                write_jsonl_line(fh, item)
                done[item["id"]] = item
    summary = summarize(label, [done[r.id] for r in records], args.samples)
    if bad_rows is not None:
        summary.update(skipped_rows=len(bad_rows), skipped=bad_rows)
    if damaged:  # every model scores 0 on these: report them rather than let them pass for model errors
        summary.update(n_damaged_golds=len(damaged), damaged_golds=damaged)
    drawn = sum(bool(r.meta.get("options_in_image")) for r in records)
    if drawn:
        summary["n_options_in_image"] = drawn
    with open(os.path.join(out_dir, f"{label}.summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


def format_table(summaries: list[dict]) -> str:
    columns = ["benchmark", "n", "skipped_rows", "accuracy", "mean_acc", "majority_acc", "pass_at_k",
               "forced_exit_rate", "mean_output_tokens", "accuracy_without_text_solvable"]
    columns = [c for c in columns if any(s.get(c) for s in summaries)]  # skipped rows: only when there are some
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = [columns] + [[fmt(s.get(c, "")) for c in columns] for s in summaries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def plot_budgets(curve: dict[str, list[tuple[int, float]]], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (the table is written)")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curve.items():
        ax.plot([b for b, _ in points], [a for _, a in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("thinking budget (tokens)")
    ax.set_ylabel("accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(out_dir: str, model: str) -> str:
    """OUT/results.md: every benchmark summarised in out_dir, each metric with its 95% interval and n, beside the
    paper's numbers for that benchmark and metric (data/benchmarks.py) and our difference to each."""
    summaries = []
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".summary.json"):
            with open(os.path.join(out_dir, name)) as fh:
                summaries.append(json.load(fh))
    lines = [f"# {model}", "", "Accuracy in %, [95% interval]; a paper column gives its number and (ours minus it). "
             "Greedy numbers are the paper's Fig. 1 and Table 5; mean@k beside its avg@5 at temperature 0.3 "
             "(Tables 1, 3, 4, 9); the paper gives no majority or pass@k numbers to set beside ours.", "",
             "| benchmark | metric | n | ours | " + " | ".join(PAPER_MODELS) + " |",
             "|---|---|---|---|" + "---|" * len(PAPER_MODELS)]
    for s in summaries:
        for metric, paper in (("accuracy", PAPER_GREEDY), ("mean_acc", PAPER_MEAN_AT_5), ("majority_acc", {}),
                              ("pass_at_k", {})):
            if metric not in s:
                continue
            ours, (low, high) = 100 * s[metric], s[f"{metric}_interval"]
            reported = paper.get(s["benchmark"], {})
            cells = [f"{reported[m]:.1f} ({ours - reported[m]:+.1f})" if m in reported else "–" for m in PAPER_MODELS]
            label = {"mean_acc": "mean@k", "majority_acc": "majority@k", "pass_at_k": "pass@k"}.get(metric, metric)
            lines.append(f"| {s['benchmark']} | {label} | {s['n']} | {ours:.1f} [{100 * low:.1f}, {100 * high:.1f}] | "
                         + " | ".join(cells) + " |")
    path = os.path.join(out_dir, "results.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def main(argv=None):
    args = parse_args(argv)
    from engine import require_model
    from provenance import describe_run, record_run, visible_devices
    specs = []
    for spec in args.benchmarks.split(","):
        name, _, path = spec.strip().partition("=")
        if name not in BENCHMARKS:
            raise SystemExit(f"error: unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
        # your own files are reported under their file name, so that several can run at once
        label = os.path.splitext(os.path.basename(path))[0] if name == "records" and path else name
        specs.append((name, path or None, label))
    require_model(args.model, trust_remote_code=args.trust_remote_code)
    run_json = os.path.join(args.output_dir, "run.json")
    record_run(run_json, describe_run("evaluate", args, visible_devices()), os.path.exists(run_json),
               RESULT_SETTINGS)
    start_grading_workers()  # they import math-verify while the data and the model load
    # every benchmark is read before the engine starts: bad data fails in seconds, and the engine
    # reserves memory for images only when some item has one
    benchmarks = [(label, *load_items(args, name, path, label)) for name, path, label in specs]
    args.multimodal = any(image_refs(r.messages) for _, records, _, _ in benchmarks for r in records)

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    exit_ids = tokenizer.encode(args.exit_text, add_special_tokens=False)
    args.max_model_len = context_length(args.model, args.max_model_len, 8192, args.trust_remote_code)
    try:
        backend = VLLMBackend.start(args, exit_ids) if args.backend == "vllm" else HFBackend(args)
    except ContextLengthError as exc:
        raise SystemExit(f"error: --max-model-len: {exc}") from None

    if args.no_forced_exit:
        runs = [(None, args.max_tokens, args.output_dir)]
    elif args.budgets:
        runs = [(b, b + args.answer_tokens, os.path.join(args.output_dir, f"budget_{b}"))
                for b in sorted(int(x) for x in args.budgets.split(","))]
    else:
        budget = args.think_budget if args.think_budget is not None else args.max_tokens - args.answer_tokens
        runs = [(budget, args.max_tokens, args.output_dir)]

    all_summaries = []
    try:
        for budget, max_tokens, out_dir in runs:
            os.makedirs(out_dir, exist_ok=True)
            for label, records, bad_rows, damaged in benchmarks:
                summary = evaluate_benchmark(backend, args, records, bad_rows, damaged, label, out_dir, budget,
                                             max_tokens, exit_ids)
                all_summaries.append({**summary, "think_budget": budget})
    finally:
        backend.close()
    print(format_table(all_summaries))
    for out_dir in dict.fromkeys(out_dir for _, _, out_dir in runs):
        print(f"wrote {write_results(out_dir, args.model)}")
    if args.budgets:
        metric = "accuracy" if args.samples == 1 else "mean_acc"
        curve = {}
        for s in all_summaries:
            curve.setdefault(s["benchmark"], []).append((s["think_budget"], s[metric]))
        with open(os.path.join(args.output_dir, "budget_scaling.json"), "w") as fh:
            json.dump(curve, fh, indent=2)
        table = ["| benchmark | " + " | ".join(str(b) for b, _, _ in runs) + " |",
                 "|---|" + "---|" * len(runs)]
        table += [f"| {name} | " + " | ".join(f"{a:.4f}" for _, a in points) + " |" for name, points in curve.items()]
        with open(os.path.join(args.output_dir, "budget_scaling.md"), "w") as fh:
            fh.write("\n".join(table) + "\n")
        print("\n".join(table))
        plot_budgets(curve, os.path.join(args.output_dir, "budget_scaling.png"))
    return all_summaries


if __name__ == "__main__":
    run_script(main)
