"""A GRPO step at the default flags, against a plain padded loop, in one run on the same model and prompts;
and vLLM-CPU's rollout throughput against transformers `generate`.

Workload: 16 prompts x 8 responses of at most 64 tokens per rollout batch, 2 optimizer steps (mini-batches)
per batch, KL against the starting model (the recipe's 0.01), the tiny Qwen2 in fp32, 1 process. `grpo.py`
runs as a user would: only the workload's flags, every speed setting at its default. The plain loop is
what a straightforward GRPO implementation does with the same engine and grader: the same vLLM settings and
seeds, then the whole rollout batch right-padded to its longest with an attention mask, old and reference
log-probs in one no-grad forward per mini-batch, one forward and backward per mini-batch, each through the
full [rows, length, vocabulary] log-softmax, AdamW, and the weights reloaded into the engine. Both use the
objective's pure functions from grpo.py, so the comparison is of how the step is laid out, not of the math.
Per-step seconds exclude the first rollout batch (engine and allocator warm-up) on both sides."""
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

from _report import print_table  # noqa: E402

from tiny_models import build_qwen2, build_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS, GROUP, TOKENS, MINI_BATCHES, STEPS = 16, 8, 64, 2, 4
PARTS = ("rollout", "grading", "training", "sync")


def write_prompts(path: str) -> None:
    with open(path, "w") as fh:
        for i in range(PROMPTS * STEPS):
            fh.write(json.dumps({"id": str(i), "messages": [{"role": "user", "content": f"What is {i} + {i}?"}],
                                 "answer": str(2 * i)}) + "\n")


def workload_flags(model: str, data: str, out: str) -> list[str]:
    return ["--model", model, "--data", data, "--output-dir", out, "--global-batch-size", str(PROMPTS),
            "--group-size", str(GROUP), "--max-response-length", str(TOKENS), "--mini-batches", str(MINI_BATCHES),
            "--max-steps", str(STEPS), "--save-every", "0"]


def ours(model: str, data: str, out: str) -> dict:
    result = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), *workload_flags(model, data, out)],
                            cwd=ROOT, check=True, capture_output=True, text=True)
    setting = next(line for line in result.stdout.splitlines() if line.startswith("model:")).split(", ", 1)[1]
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh][1:]
    return {"setting": setting, **{p: sum(r[f"seconds_{p}"] for r in rows) / len(rows) for p in PARTS}}


def plain_padded_loop(model_dir: str, data: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    import grpo
    from data import grade_many, load_records
    from engine import make_llm, shutdown_llm
    from training import step_indices

    args = grpo.parse_args(workload_flags(model_dir, data, "unused"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = load_records(data, style="train")
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True),
                                add_special_tokens=False) for r in records]
    torch.manual_seed(args.seed)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").train()
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    llm = make_llm(model_dir, max_model_len=args.max_prompt_length + args.max_response_length, seed=args.seed,
                   in_process=True, logprobs_mode="processed_logprobs")

    def response_logprobs(model, ids, mask):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float() / args.temperature
        return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)

    times = {p: [] for p in PARTS}
    for step in range(STEPS):
        start = time.perf_counter()
        mine = step_indices(len(records), PROMPTS, step, STEPS, args.seed)
        outputs = llm.generate([{"prompt_token_ids": prompts[i]} for i in mine], [SamplingParams(
            n=GROUP, temperature=args.temperature, max_tokens=TOKENS, logprobs=0,
            seed=grpo.rollout_seed(args.seed, step, k, GROUP, PROMPTS)) for k in range(len(mine))], use_tqdm=False)
        times["rollout"].append(time.perf_counter() - start)

        start = time.perf_counter()
        samples = [(prompts[i], list(o.token_ids), records[i]) for i, out in zip(mine, outputs) for o in out.outputs]
        rewards = grade_many([tokenizer.decode(r, skip_special_tokens=True) for _, r, _ in samples],
                             [rec.answer for _, _, rec in samples], [rec.options for _, _, rec in samples])
        advantages = grpo.group_advantages(torch.tensor(rewards), GROUP)
        times["grading"].append(time.perf_counter() - start)

        start = time.perf_counter()
        width = max(len(p) + len(r) for p, r, _ in samples)
        ids = torch.tensor([p + r + [0] * (width - len(p) - len(r)) for p, r, _ in samples])
        mask = torch.tensor([[1] * (len(p) + len(r)) + [0] * (width - len(p) - len(r)) for p, r, _ in samples])
        is_response = torch.tensor([[0] * (len(p) - 1) + [1] * len(r) + [0] * (width - len(p) - len(r))
                                    for p, r, _ in samples], dtype=torch.float32)
        rows = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed + step))
        minis = rows.chunk(MINI_BATCHES)
        with torch.no_grad():
            old = torch.cat([response_logprobs(policy, ids[m], mask[m]) for m in minis])
            ref = torch.cat([response_logprobs(reference, ids[m], mask[m]) for m in minis])
        for k, m in enumerate(minis):
            span = slice(sum(len(x) for x in minis[:k]), sum(len(x) for x in minis[:k + 1]))
            logprobs = response_logprobs(policy, ids[m], mask[m])
            surrogate, _, _ = grpo.clipped_surrogate(logprobs, old[span], advantages[m, None], args.clip_low,
                                                     args.clip_high)
            per_token = surrogate + args.kl_coef * grpo.kl_penalty(logprobs, ref[span], args.kl_estimator)
            grpo.token_sum_loss(per_token, is_response[m], is_response[m].sum()).backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times["training"].append(time.perf_counter() - start)

        start = time.perf_counter()
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(policy.state_dict().items())})
        llm.reset_prefix_cache()
        times["sync"].append(time.perf_counter() - start)
    shutdown_llm(llm)
    return {"setting": "padded batch, sdpa, full logits", **{p: sum(v[1:]) / len(v[1:]) for p, v in times.items()}}


def rollout_speed(model: str) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    from engine import make_llm, shutdown_llm
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [tok.encode(f"What is {i} + {i}?", add_special_tokens=False) for i in range(PROMPTS)]
    llm = make_llm(model, max_model_len=512)
    params = SamplingParams(n=GROUP, temperature=1.0, max_tokens=TOKENS, ignore_eos=True, seed=0)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params, use_tqdm=False)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    vllm_s = time.perf_counter() - start
    shutdown_llm(llm)

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tok.padding_side = "left"
    batch = tok([tok.decode(p) for p in prompts for _ in range(GROUP)], return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.no_grad():
        hf.generate(**batch, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=True, temperature=1.0,
                    pad_token_id=tok.pad_token_id)
    hf_s = time.perf_counter() - start
    n_tokens = PROMPTS * GROUP * TOKENS
    return [{"backend": "vLLM-CPU", "seconds": vllm_s, "tokens_per_s": n_tokens / vllm_s},
            {"backend": "transformers generate", "seconds": hf_s, "tokens_per_s": n_tokens / hf_s}]


def row(name: str, result: dict, baseline: dict) -> dict:
    step = sum(result[p] for p in PARTS)
    return {"trainer": name, "setting": result["setting"], **{f"{p}_s": result[p] for p in PARTS}, "step_s": step,
            "training_speedup": baseline["training"] / result["training"],
            "step_speedup": sum(baseline[p] for p in PARTS) / step}


if __name__ == "__main__":
    work = tempfile.mkdtemp()
    tok = build_tokenizer(f"{work}/tok")
    model = build_qwen2(f"{work}/model", tok)
    data = os.path.join(work, "prompts.jsonl")
    write_prompts(data)
    plain = plain_padded_loop(model, data)
    config = f"{PROMPTS} prompts x {GROUP} responses x {TOKENS} tokens, {MINI_BATCHES} optimizer steps per batch"
    print_table(f"bench/grpo_step.py: seconds per GRPO step, tiny Qwen2, {config}, 1 process",
                [row("plain padded loop", plain, plain), row("grpo.py, default flags", ours(model, data, work + "/o"),
                                                             plain)])
    print_table(f"bench/grpo_step.py: rollout throughput, {PROMPTS} prompts x {GROUP} x {TOKENS} tokens",
                rollout_speed(model))
