"""vLLM-CPU decode time at batch 64 on the tiny model: no processor, ForcedExitLogitsProcessor, and
vLLM's built-in `thinking_token_budget` (a reasoning config) for comparison. Target: under 5% overhead."""
import gc
import os
import tempfile
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

from _report import print_table  # noqa: E402

from tiny_models import build_qwen2, build_tokenizer  # noqa: E402

BATCH, MAX_TOKENS, BUDGET, REPEATS = 64, 256, 128, 5


def timed(llm, prompts, params) -> float:
    llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
        assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs)
    return best


def main():
    from vllm import LLM, SamplingParams

    from engine import make_llm
    work = tempfile.mkdtemp()
    tok = build_tokenizer(f"{work}/tok", think_token=True)
    model = build_qwen2(f"{work}/model", tok)
    exit_ids = tok.encode("</think>", add_special_tokens=False)
    prompts = [{"prompt_token_ids": tok.encode(f"question {i} <think>", add_special_tokens=False)}
               for i in range(BATCH)]
    base = dict(model=model, max_model_len=512, dtype="float32", enforce_eager=True, seed=0,
                kv_cache_memory_bytes=1 << 30, max_num_seqs=BATCH)
    rows = []

    def record(name, seconds, reference=None):
        rows.append({"setting": name, "seconds": seconds, "decode_tokens_per_s": BATCH * MAX_TOKENS / seconds,
                     "overhead_pct": 100 * (seconds / reference - 1) if reference else 0.0})

    plain = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    llm = LLM(**base)
    t_plain = timed(llm, prompts, plain)
    record("no processor", t_plain)
    del llm
    gc.collect()

    llm = make_llm(model, max_model_len=512, max_num_seqs=BATCH, in_process=True, exit_ids=exit_ids)
    record("ForcedExit registered, no budgets", timed(llm, prompts, plain), t_plain)
    budgeted = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                              extra_args={"think_budget": BUDGET, "think_exit_ids": exit_ids})
    record(f"ForcedExit, budget {BUDGET} on all 64", timed(llm, prompts, budgeted), t_plain)
    del llm
    gc.collect()

    try:
        llm = LLM(**base, reasoning_config={"reasoning_start_str": "<think>", "reasoning_end_str": "</think>"})
        builtin = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, thinking_token_budget=BUDGET)
        record(f"vLLM thinking_token_budget {BUDGET}", timed(llm, prompts, builtin), t_plain)
    except Exception as exc:  # the built-in is a peer for comparison, not a dependency
        print(f"vLLM's built-in thinking_token_budget could not be enabled: {exc}")
    print_table(f"bench/forced_exit_overhead.py: batch {BATCH}, {MAX_TOKENS} tokens each, best of {REPEATS}", rows)


if __name__ == "__main__":
    main()
