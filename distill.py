"""Long-CoT distillation by rejection sampling (X-Reasoner-Med's SFT data, paper §2.1).

    python distill.py --teacher Qwen/QwQ-32B --data medqa --output medqa_qwq.jsonl \\
        --samples 4 --keep 1 --tensor-parallel-size 4

Each question is put to the teacher under the paper's training prompt, --samples times. A trace is
kept only if it closed its thinking (`</think>`) by itself, finished normally (not cut at
--max-tokens, no forced exit) and its answer is correct under the shared grader; up to --keep per
question. Rows are written in the format sft.py reads (`sft.py --data OUT` needs no conversion),
with the question id and the teacher's name. The output is appended to as questions finish, a rerun
skips questions already done, and `--shard i/n` takes a deterministic 1/n of the questions so that n
machines can split a large set (their outputs concatenate into the whole). A summary goes to
OUT.summary.json, and what the run was (provenance.py) to OUT.run.json; a rerun with other sampling
settings into the same output is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections import Counter

from data import Record, add_data_arguments, extract_answer, grade_many, load_records
from data.grading import start_grading_workers
from data.records import open_for_append, run_script, write_jsonl_line
from forced_exit import DEFAULT_EXIT_TEXT, count_forced


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher model: directory or hub id (paper: QwQ-32B)")
    add_data_arguments(p, "questions with gold answers")
    p.add_argument("--output", required=True, help="JSONL to append kept traces to (sft.py's input format)")
    p.add_argument("--samples", type=int, default=4, help="samples per question (default 4)")
    p.add_argument("--keep", type=int, default=1, help="correct traces kept per question (default 1)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (default 0.6, as QwQ's card)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95, as QwQ's card)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling (default 40, as QwQ's card; -1 = off)")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens per trace; longer ones are rejected (8192)")
    p.add_argument("--think-budget", type=int,
                   help="force </think> after this many tokens to bound wasted compute; forced traces are rejected")
    p.add_argument("--exit-text", default=DEFAULT_EXIT_TEXT, help="text that closes the thinking (default </think>)")
    p.add_argument("--shard", default="0/1", help="i/n: process the questions whose id hashes to shard i of n")
    p.add_argument("--limit", type=int, help="only the first N questions (before sharding)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM tensor parallelism")
    p.add_argument("--max-model-len", type=int,
                   help="vLLM context length, prompt + trace (default: 10,240, or the model's maximum if smaller)")
    p.add_argument("--chunk-size", type=int, default=512, help="questions sampled (and saved) per chunk")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model dir")
    args = p.parse_args(argv)
    try:
        args.shard_index, args.shard_count = map(int, args.shard.split("/"))
        assert 0 <= args.shard_index < args.shard_count
    except (ValueError, AssertionError):
        p.error(f"--shard must be i/n with 0 <= i < n, got {args.shard!r}")
    return args


def in_shard(question_id: str, index: int, count: int) -> bool:
    digest = hashlib.sha1(question_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % count == index


def split_trace(text: str, exit_text: str) -> tuple[str, str] | None:
    """(thinking, the rest) of a response that closed its thinking; None if it never did."""
    if exit_text not in text:
        return None
    think, _, rest = text.rpartition(exit_text)
    think = think.strip()
    if think.startswith("<think>"):
        think = think[len("<think>"):].strip()
    return think, rest.strip()


def done_questions(output: str) -> tuple[set[str], list[dict]]:
    """Question ids already processed: those in the progress file, and those with rows in the output (a
    run stopped between the two writes)."""
    progress, done = [], set()
    if os.path.exists(output + ".progress"):
        with open(output + ".progress") as fh:
            progress = [json.loads(line) for line in fh if line.strip()]
        done = {p["question_id"] for p in progress}
    if os.path.exists(output):
        with open(output) as fh:
            for line in fh:
                if line.strip():
                    try:
                        done.add(json.loads(line)["meta"]["question_id"])
                    except (json.JSONDecodeError, KeyError):
                        pass  # a line cut by an interrupted run
    return done, progress


# arguments that decide what the output's traces are: a rerun into the same output must keep them
TRACE_SETTINGS = ("teacher", "data", "data_format", "data_split", "samples", "keep", "temperature", "top_p", "top_k",
                  "max_tokens", "think_budget", "exit_text", "shard", "seed")


def main(argv=None):
    args = parse_args(argv)
    from engine import require_model
    from provenance import describe_run, record_run, visible_devices
    require_model(args.teacher, "--teacher", args.trust_remote_code)
    run_json = args.output + ".run.json"
    record_run(run_json, describe_run("distill", args, visible_devices()), os.path.exists(run_json), TRACE_SETTINGS)
    records = load_records(args.data, args.data_format, args.data_split, style="train", limit=args.limit)
    no_answer = [r for r in records if not r.answer]
    questions = [r for r in records if r.answer and in_shard(r.id, args.shard_index, args.shard_count)]
    done, _ = done_questions(args.output)
    todo = [r for r in questions if r.id not in done]
    print(f"{len(records)} questions, {len(no_answer)} without a gold answer skipped, {len(questions)} in shard "
          f"{args.shard}, {len(questions) - len(todo)} already done, {len(todo)} to sample")

    from transformers import AutoTokenizer
    from engine import ContextLengthError, context_length, make_llm, shutdown_llm
    tokenizer = AutoTokenizer.from_pretrained(args.teacher, trust_remote_code=args.trust_remote_code)
    exit_ids = tokenizer.encode(args.exit_text, add_special_tokens=False)
    teacher = os.path.basename(os.path.normpath(args.teacher))
    if todo:
        start_grading_workers()  # they import math-verify while the teacher loads
    args.max_model_len = context_length(args.teacher, args.max_model_len, 10240, args.trust_remote_code)
    try:
        llm = make_llm(args.teacher, max_model_len=args.max_model_len, seed=args.seed,
                       tensor_parallel_size=args.tensor_parallel_size, trust_remote_code=args.trust_remote_code,
                       exit_ids=exit_ids if args.think_budget is not None else None) if todo else None
    except ContextLengthError as exc:
        raise SystemExit(f"error: --max-model-len: {exc}") from None

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    try:
        sample_and_write(llm, todo, tokenizer, exit_ids, teacher, args)
    finally:
        if llm is not None:
            shutdown_llm(llm)

    _, progress_rows = done_questions(args.output)
    summary = summarize(progress_rows, len(no_answer), args.samples)
    with open(args.output + ".summary.json", "w") as fh:
        json.dump(summary, fh, indent=2)
    print(json.dumps(summary, indent=2))
    return summary


def sample_and_write(llm, todo, tokenizer, exit_ids, teacher: str, args) -> None:
    """Sample every question in chunks; append kept traces and one progress line per question."""
    from vllm import SamplingParams

    from engine import budget_args
    with open_for_append(args.output) as out, open_for_append(args.output + ".progress") as progress:
        for start in range(0, len(todo), args.chunk_size):
            chunk = todo[start:start + args.chunk_size]
            prompts = [{"prompt_token_ids": tokenizer.encode(tokenizer.apply_chat_template(
                r.messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)} for r in chunk]
            # no per-request seed: it turns FlashInfer's fused top-k/top-p sampling off (vLLM's samplers), and the
            # engine's own --seed already repeats a run; a resumed run draws new samples for what is left
            params = SamplingParams(n=args.samples, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                    max_tokens=args.max_tokens, extra_args=budget_args(args.think_budget, exit_ids))
            outputs = llm.generate(prompts, params, use_tqdm=True)
            # Grade the part after the thinking: an answer tried and dropped while thinking must not count.
            finals = [[split_trace(o.text, args.exit_text) for o in out_.outputs] for out_ in outputs]
            flat = [(r, f, o) for r, fs, out_ in zip(chunk, finals, outputs) for f, o in zip(fs, out_.outputs)]
            scores = grade_many([f[1] if f else None for _, f, _ in flat], [r.answer for r, _, _ in flat],
                                [r.options for r, _, _ in flat])
            position = 0
            for record, output in zip(chunk, outputs):
                kept, correct = [], 0
                for sample_index, o in enumerate(output.outputs):
                    _, trace, _ = flat[position]
                    score = scores[position]
                    position += 1
                    correct += int(score == 1.0)
                    forced = args.think_budget is not None and bool(count_forced(o.token_ids, args.think_budget,
                                                                                 exit_ids, decode=tokenizer.decode))
                    if score == 1.0 and trace and o.finish_reason == "stop" and not forced and len(kept) < args.keep:
                        think, rest = trace
                        answer = extract_answer(rest) or rest
                        kept.append((sample_index, think, answer, len(o.token_ids)))
                for sample_index, think, answer, n_tokens in kept:
                    row = Record(id=f"{record.id}#{sample_index}", messages=record.messages, answer=record.answer,
                                 kind=record.kind, options=record.options, target_think=think, target_answer=answer,
                                 meta={**record.meta, "question_id": record.id, "teacher": teacher,
                                       "sample_index": sample_index, "trace_tokens": n_tokens})
                    write_jsonl_line(out, row.to_json())
                write_jsonl_line(progress, {"question_id": record.id, "samples": len(output.outputs),
                                            "correct": correct, "kept": len(kept),
                                            "kept_tokens": [k[3] for k in kept]})


def summarize(progress_rows: list[dict], skipped_no_answer: int, samples: int) -> dict:
    n_samples = sum(p["samples"] for p in progress_rows)
    kept_tokens = [t for p in progress_rows for t in p["kept_tokens"]]
    return {"questions": len(progress_rows), "skipped_no_gold_answer": skipped_no_answer, "samples": n_samples,
            "correct_samples": sum(p["correct"] for p in progress_rows), "kept": len(kept_tokens),
            "acceptance_rate": len(kept_tokens) / n_samples if n_samples else 0.0,
            "questions_with_a_kept_trace": sum(1 for p in progress_rows if p["kept"]),
            "correct_per_question": {str(k): v for k, v in sorted(Counter(p["correct"] for p in progress_rows).items())},
            "mean_kept_trace_tokens": sum(kept_tokens) / len(kept_tokens) if kept_tokens else 0.0}


if __name__ == "__main__":
    run_script(main)
