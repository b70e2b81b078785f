"""Stage 2 of X-Reasoner: GRPO on verifiable text-only math (paper §2.2, App. A, B.2).

    torchrun --nproc_per_node 8 grpo.py --model runs/sft/model --data orz_math_57k_collected.json \\
        --output-dir runs/grpo

Each rank owns a colocated vLLM engine and samples --group-size responses for its share of the
prompts; rewards come from the shared grader (1 if the answer is equivalent to the gold, else 0; no
format reward). The objective is GRPO with group-normalised advantages, DAPO's clip-higher, the
token-sum loss divided by the number of response tokens in the whole global batch, and a k3 KL
penalty against the starting model. Each rollout batch is split into --mini-batches optimizer steps,
so that the ratio moves away from 1 and the clip acts (with one step per batch it never would).
After each rollout batch's last optimizer step the new weights are loaded into the engines.
The recipe's prompts are text; prompts with images (a VLM policy) are rolled out and trained on with
their images, the multimodal-RL ablation (the vision tower stays frozen unless --train names it).
A run keeps OUT/run.json, OUT/metrics.jsonl, responses to read (OUT/rollouts/), checkpoints and the model;
with --eval-data it scores held-out prompts as evaluate.py does every --eval-every steps.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from data import add_data_arguments, extract_answer, grade_many, load_records, run_script
from data.prompts import image_refs, readable
from data.records import Record
from engine import encode_prompt
from forced_exit import DEFAULT_EXIT_TEXT, count_forced
from packing import collate_sequences, layout_for, micro_batches, target_logprobs
from training import (add_trainer_arguments, all_reduce_max, all_reduce_sum, as_many_on_every_rank,
                      exit_without_teardown, latest_checkpoint, sum_over_ranks, write_jsonl_of_all_ranks)


# --- the objective (pure functions) -------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Per-response advantages from rewards laid out group by group: (r - mean_g) / (std_g + eps), with
    the unbiased std, or r - mean_g (Dr. GRPO). A group of one has mean 0 and std 1 (as verl)."""
    groups = rewards.float().view(-1, group_size)
    if group_size == 1:
        return groups.flatten()
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.flatten()


def clipped_surrogate(logprobs, old_logprobs, advantages, clip_low: float = 0.2, clip_high: float = 0.28):
    """Per token: the clipped surrogate loss -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A),
    and where the clip chose the term below (ratio < 1 - clip_low, A < 0) and above (ratio > 1 + clip_high,
    A > 0): there the gradient is zero. Shapes broadcast: advantages one per token, or [B, 1] against [B, T]."""
    ratio = torch.exp(logprobs - old_logprobs)
    advantages = advantages.to(logprobs.dtype)
    loss = -torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages)
    with torch.no_grad():
        clipped_low = (ratio < 1 - clip_low) & (advantages < 0)
        clipped_high = (ratio > 1 + clip_high) & (advantages > 0)
    return loss, clipped_low, clipped_high


def token_sum_loss(per_token, weights, divisor: float):
    """sum(per_token * weights) / divisor. With the divisor the weighted tokens of the whole global mini-batch,
    every token weighs the same whatever sequence, micro-batch or rank it is in (DAPO's token-level loss)."""
    return (per_token * weights.to(per_token.dtype)).sum() / max(float(divisor), 1.0)


def kl_penalty(logprobs, ref_logprobs, estimator: str = "k3"):
    """Per-token estimate of KL(policy || reference) from sampled tokens. k3 (default, non-negative):
    e^d - d - 1 with d = ref - logp; k1: logp - ref; k2: (logp - ref)^2 / 2."""
    delta = ref_logprobs - logprobs
    if estimator == "k3":
        return torch.exp(delta) - delta - 1
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta ** 2
    raise ValueError(f"unknown KL estimator {estimator!r}")


# --- config ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--model", required=True, help="starting policy, usually sft.py's OUT/model")
    add_data_arguments(data, "prompts with gold answers")
    data.add_argument("--max-prompt-length", type=int, default=1024, help="longer prompts are dropped at load (1024)")
    data.add_argument("--global-batch-size", type=int, default=128, help="prompts per rollout batch (paper: 128)")
    data.add_argument("--epochs", type=int, default=3, help="passes over the prompts (paper: 3)")
    rollout = p.add_argument_group("rollout")
    rollout.add_argument("--group-size", type=int, default=8, help="responses per prompt (paper: 8)")
    rollout.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (paper: 1.0)")
    rollout.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (paper: not stated; off)")
    rollout.add_argument("--max-response-length", type=int, default=4096, help="tokens per response (paper: 4096)")
    rollout.add_argument("--think-budget", type=int,
                         help="force </think> after this many tokens (default off); forced tokens leave the loss")
    rollout.add_argument("--exit-text", default=DEFAULT_EXIT_TEXT, help="text forced at the budget (</think>)")
    rollout.add_argument("--grading-workers", type=int, help="math grading processes (default: min(8, CPUs))")
    rollout.add_argument("--grading-timeout", type=float, default=5.0, help="seconds per graded answer (default 5)")
    objective = p.add_argument_group("objective")
    objective.add_argument("--clip-low", type=float, default=0.2, help="lower clip epsilon (paper: 0.2)")
    objective.add_argument("--clip-high", type=float, default=0.28,
                           help="upper clip epsilon, clip-higher (paper: not stated; DAPO's 0.28)")
    objective.add_argument("--kl-coef", type=float, default=0.01,
                           help="KL weight against the starting model (paper: 0.01); 0 loads no reference")
    objective.add_argument("--kl-estimator", choices=["k3", "k1", "k2"], default="k3",
                           help="KL estimator (paper: not stated; default k3, verl's low_var_kl)")
    objective.add_argument("--no-std-scaling", action="store_true",
                           help="advantages r - mean, not divided by the group's std (Dr. GRPO)")
    objective.add_argument("--mask-truncated", action="store_true",
                           help="leave responses cut at --max-response-length out of the loss (default: kept)")
    optimizer = p.add_argument_group("optimizer")
    optimizer.add_argument("--lr", type=float, default=3e-6, help="AdamW learning rate (paper: 3e-6)")
    optimizer.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (paper: 0.01)")
    optimizer.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warm-up share of all steps (0.1)")
    optimizer.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (paper: 1.0)")
    optimizer.add_argument("--mini-batches", type=int, default=4,
                           help="optimizer steps per rollout batch (paper: not stated; default 4, so the clip acts)")
    optimizer.add_argument("--max-tokens-per-micro-batch", type=int, default=16384,
                           help="prompt + response tokens per forward and rank, padding included (default 16,384)")
    engine = p.add_argument_group("engine")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.6,
                        help="GPU share of each colocated vLLM engine (default 0.6; docs/performance.md)")
    engine.add_argument("--sync-check", action="store_true",
                        help="after each weight sync, check 16 greedy tokens of vLLM against the policy (logged)")
    run = add_trainer_arguments(p)
    run.add_argument("--max-steps", type=int, help="stop after this many rollout batches (smoke runs, tests)")
    run.add_argument("--seed", type=int, default=0, help="data order and sampling seed")
    run.add_argument("--save-every", type=int, default=50, help="checkpoint every K rollout batches; 0 = never")
    run.add_argument("--save-rollouts-every", type=int, default=10,
                     help="write every response of each K-th rollout batch to OUT/rollouts/ (0 = never)")
    run.add_argument("--eval-data", help="held-out prompts scored as evaluate.py does (greedy, forced exit)")
    run.add_argument("--eval-every", type=int, default=50, help="rollout batches between held-out scores (50)")
    return p.parse_args(argv)


# --- rollouts and log-probabilities ------------------------------------------------------------------------

class Prompt(NamedTuple):
    """A prompt as both the engine and the trainer see it."""
    record: Record
    ids: list[int]  # the chat template's generation prompt, each image's placeholder expanded to its patches
    image_grid_thw: torch.Tensor | None  # [images, 3] patches per image; None for a text prompt

    @property
    def images(self) -> list:
        return image_refs(self.record.messages) if self.image_grid_thw is not None else []


@dataclass
class Sample:
    """One response: its tokens, which were forced, and what grading and the trainer's forwards add to it."""
    prompt: Prompt
    response_ids: list[int]
    vllm_logprobs: list[float]
    forced: list[int]
    truncated: bool
    text: str
    reward: float = 0.0
    advantage: float = 0.0
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None

    def loss_mask(self, mask_truncated: bool) -> list[float]:
        if self.truncated and mask_truncated:
            return [0.0] * len(self.response_ids)
        forced = set(self.forced)  # forced tokens were not sampled from the policy
        return [0.0 if j in forced else 1.0 for j in range(len(self.response_ids))]


def rollout_seed(seed: int, step: int, prompt_index: int, group_size: int, prompts_per_step: int) -> int:
    """The seed of one prompt's request. vLLM gives its j-th sample the seed + j, so requests are spaced
    group_size apart: every (run seed, step, prompt of the global batch, sample) has its own stream."""
    return seed * 2 ** 40 + (step * prompts_per_step + prompt_index) * group_size


def rollout(llm, prompts: list[Prompt], args, step: int, exit_ids, tokenizer, first_index: int,
            stop_ids: list[int]) -> list[list[Sample]]:
    """One group per prompt: its group_size responses. first_index is this rank's first prompt in the global
    batch. stop_ids end a response besides EOS: a VLM's image and video placeholders, which the trainer's
    forward would take for an image's place (vLLM embeds a sampled one as text)."""
    from vllm import SamplingParams

    from engine import budget_args, vllm_request
    params = [SamplingParams(n=args.group_size, temperature=args.temperature, top_p=args.top_p,
                             max_tokens=args.max_response_length, logprobs=0, stop_token_ids=stop_ids,
                             seed=rollout_seed(args.seed, step, first_index + i, args.group_size,
                                               args.global_batch_size),
                             extra_args=budget_args(args.think_budget, exit_ids))
              for i in range(len(prompts))]
    # a text prompt goes as its ids; an image prompt as text and images, which vLLM lays out itself
    outputs = llm.generate([vllm_request(tokenizer, p.record.messages, {}) for p in prompts], params,
                           use_tqdm=False)
    groups = []
    for prompt, output in zip(prompts, outputs):
        if list(output.prompt_token_ids) != prompt.ids:  # the trainer must score what the engine sampled from
            raise RuntimeError(f"vLLM laid out the prompt of id {prompt.record.id} differently from the model's "
                               f"processor ({len(output.prompt_token_ids)} tokens against {len(prompt.ids)})")
        group = []
        for o in output.outputs:
            ids = list(o.token_ids)
            forced = count_forced(ids, args.think_budget, exit_ids, decode=tokenizer.decode) \
                if args.think_budget is not None else []
            group.append(Sample(prompt, ids, [lp[t].logprob for lp, t in zip(o.logprobs, ids)], forced,
                                o.finish_reason == "length", tokenizer.decode(ids, skip_special_tokens=True)))
        groups.append(group)
    return groups


def grade_groups(groups: list[list[Sample]], args) -> list[list[Sample]]:
    """Each response's reward (1 if the shared grader accepts its answer, else 0) and its advantage within
    its group; returns the groups the update trains on (every one: the recipe keeps groups whose rewards
    are all equal, which have advantage 0 and add only to the divisor)."""
    samples = [s for group in groups for s in group]
    records = [s.prompt.record for s in samples]
    rewards = grade_many([s.text for s in samples], [r.answer for r in records], [r.options for r in records],
                         args.grading_workers, args.grading_timeout)
    for s, reward in zip(samples, rewards):
        s.reward = reward
    for group in groups:
        advantages = group_advantages(torch.tensor([s.reward for s in group]), len(group), not args.no_std_scaling)
        for s, advantage in zip(group, advantages.tolist()):
            s.advantage = advantage
    return groups


def collate(samples: list[Sample], layout: str, model=None, image_processor=None):
    """A micro-batch in the layout (packing.pack); the targets are the response tokens, each predicted from
    the position before it. The last response token predicts nothing, so it is not an input: a response
    that ends in a VLM's image placeholder (a stop token of the rollout) then has no placeholder without
    its image. Image prompts bring their pixels and mrope positions (packing.collate_sequences)."""
    return collate_sequences([s.prompt.ids + s.response_ids[:-1] for s in samples],
                             [[(len(s.prompt.ids) - 1 + j, t) for j, t in enumerate(s.response_ids)] for s in samples],
                             layout, [s.prompt.images for s in samples], [s.prompt.image_grid_thw for s in samples],
                             model, image_processor)


def per_sample(samples: list[Sample], values: torch.Tensor) -> list[torch.Tensor]:
    """Cut a micro-batch's flat per-response-token values into one tensor per sample."""
    return list(values.detach().cpu().split([len(s.response_ids) for s in samples]))


def flat(values: list, device) -> torch.Tensor:
    """Per-sample lists of per-response-token values, concatenated in sample order (as collate's targets)."""
    return torch.cat([torch.as_tensor(v, dtype=torch.float32) for v in values] or [torch.zeros(0)]).to(device)


def micro_batches_of(samples: list[Sample], args, device) -> list[list[Sample]]:
    """Samples cut by the token budget, in as many micro-batches as on every other rank (some may be empty)."""
    lengths = [len(s.prompt.ids) + len(s.response_ids) for s in samples]
    groups = as_many_on_every_rank(micro_batches(lengths, args.max_tokens_per_micro_batch, args.layout), device)
    return [[samples[i] for i in group] for group in groups]


@torch.no_grad()
def logprobs_of(model, samples: list[Sample], args, device, with_entropy=False,
                image_processor=None) -> tuple[list[torch.Tensor], float]:
    """Each sample's response log-probs under the model, and with_entropy the summed entropy of the tokens that
    enter the loss (else 0). The forward with targets (packing.install_target_logprobs): the targets' log-probs
    in chunks, never the full [tokens, vocabulary] logits."""
    values, entropy_sum = {}, 0.0
    for chunk in micro_batches_of(samples, args, device):
        logprobs, entropy = target_logprobs(model, collate(chunk, args.layout, model, image_processor), device,
                                            args.temperature, with_entropy)
        values.update(zip(map(id, chunk), per_sample(chunk, logprobs)))
        if with_entropy:
            entropy_sum += loss_token_sum(chunk, entropy, args)
    return [values[id(s)] for s in samples], entropy_sum


def loss_token_sum(chunk: list[Sample], values, args) -> float:
    """A micro-batch's flat per-response-token values summed over the tokens that enter the loss."""
    return sum(float((v * torch.tensor(s.loss_mask(args.mask_truncated))).sum())
               for s, v in zip(chunk, per_sample(chunk, values)))


# --- the update ---------------------------------------------------------------------------------------------

def comparison_logprobs(model, reference, mini_batches: list[list[Sample]], args, device, image_processor=None) -> float:
    """The log-probs the update compares with: the sampling policy's for every mini-batch but the first (whose own
    training forward gives them, before any update moves the weights), and the reference's for all. Returns the
    summed entropy of the later mini-batches' loss tokens (the first's comes from its training forward)."""
    later = [s for mini in mini_batches[1:] for s in mini]
    old, entropy = logprobs_of(model, later, args, device, True, image_processor)
    for s, values in zip(later, old):
        s.old_logprobs = values
    if reference is not None:
        samples = [s for mini in mini_batches for s in mini]
        for s, values in zip(samples, logprobs_of(reference, samples, args, device, False, image_processor)[0]):
            s.ref_logprobs = values
        # FSDP2 keeps a root unit gathered after forward (torch/distributed/fsdp/_fully_shard/_fsdp_state.py,
        # "For the root, do not reshard after forward"); the reference has no backward to free it
        reference.reshard()
    return entropy


def mini_batch_divisor(mini: list[Sample], args, device) -> float:
    """What a mini-batch's loss is divided by: its weighted response tokens on every rank."""
    return all_reduce_sum(sum(sum(s.loss_mask(args.mask_truncated)) for s in mini), device).item()


def mini_batch_loss(chunk: list[Sample], logprobs, divisor: float, args, device):
    """The loss of one micro-batch of a mini-batch: the one place where the per-token terms (the clipped
    surrogate, plus kl_coef times the KL estimate against the reference), their weights (each sample's
    loss mask: forced tokens and, with --mask-truncated, cut responses out) and the divisor meet. Returns
    the loss and the weighted token sums the metrics report."""
    weights = flat([s.loss_mask(args.mask_truncated) for s in chunk], device)
    old = flat([s.old_logprobs for s in chunk], device)
    advantages = flat([[s.advantage] * len(s.response_ids) for s in chunk], device)
    per_token, clipped_low, clipped_high = clipped_surrogate(logprobs, old, advantages, args.clip_low, args.clip_high)
    sums = {"clipped_low": float((clipped_low * weights).sum()), "clipped_high": float((clipped_high * weights).sum())}
    if args.kl_coef > 0:
        kl = kl_penalty(logprobs, flat([s.ref_logprobs for s in chunk], device), args.kl_estimator)
        per_token = per_token + args.kl_coef * kl
        sums["kl"] = float((kl.detach() * weights).sum())
    return token_sum_loss(per_token, weights, divisor), sums


def split_mini_batches(samples: list[Sample], count: int, seed: int) -> list[list[Sample]]:
    """The samples in a seeded random order, cut into count mini-batches as evenly as the count allows."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    cuts = [round(m * len(samples) / count) for m in range(count + 1)]
    return [[samples[i] for i in order[cuts[m]:cuts[m + 1]]] for m in range(count)]


def update(model, optimizer, scheduler, params, mini_batches: list[list[Sample]], args, step: int, device,
           image_processor=None) -> tuple[dict, dict]:
    """One optimizer step per mini-batch. The first mini-batch's old log-probs (and the entropy the metrics
    log) come from its own training forward: no update has happened yet, so the policy computing them is
    the one that sampled. Returns (the global loss and grad norm summed over the steps taken, and their
    count; this rank's weighted token sums for the metrics)."""
    world = dist.get_world_size()
    taken, token_sums = {"loss": 0.0, "grad_norm": 0.0, "optimizer_steps": 0}, {"entropy": 0.0}
    for m, mini in enumerate(mini_batches):
        divisor = mini_batch_divisor(mini, args, device)
        loss_sum = 0.0
        for chunk in micro_batches_of(mini, args, device):
            # the forward with targets installed by training.load_model (packing.install_target_logprobs)
            logprobs, entropy = target_logprobs(model, collate(chunk, args.layout, model, image_processor), device,
                                                args.temperature, with_entropy=m == 0)
            if m == 0:
                for s, values in zip(chunk, per_sample(chunk, logprobs)):
                    s.old_logprobs = values
                token_sums["entropy"] += loss_token_sum(chunk, entropy, args)
            loss, sums = mini_batch_loss(chunk, logprobs, divisor, args, device)
            (loss * world).backward()  # FSDP averages gradients over ranks; the divisor is global already
            loss_sum += loss.item()
            for key, value in sums.items():
                token_sums[key] = token_sums.get(key, 0.0) + value
        if divisor == 0:  # no token to learn from on any rank: no step for the optimizer or the schedule
            optimizer.zero_grad(set_to_none=True)
            continue
        loss_sum = all_reduce_sum(loss_sum, device).item()
        if not math.isfinite(loss_sum):
            raise SystemExit(f"error: step {step + 1}, mini-batch {m + 1}: the loss is {loss_sum}; stopping "
                             f"without saving a checkpoint from this state (the last good one: "
                             f"{latest_checkpoint(args.output_dir)})")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
        taken["grad_norm"] += grad_norm.full_tensor().item() if hasattr(grad_norm, "full_tensor") else grad_norm.item()
        taken["loss"] += loss_sum
        taken["optimizer_steps"] += 1
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return taken, token_sums


def step_metrics(groups: list[list[Sample]], trained: list[list[Sample]], taken: dict, token_sums: dict, args,
                 device) -> dict:
    """The rollout batch's metrics: named sums over ranks (one all-reduce), each divided by what it is a
    mean over. Rewards and lengths are of every sampled group; the loss's statistics of the trained ones."""
    sampled = [s for group in groups for s in group]
    samples = [s for group in trained for s in group]
    weights = [s.loss_mask(args.mask_truncated) for s in samples]
    local = {"reward": sum(s.reward for s in sampled), "responses": len(sampled), "groups": len(groups),
             "groups_all_equal": sum(len({s.reward for s in group}) == 1 for group in groups),
             "groups_trained": len(trained), "response_tokens": sum(len(s.response_ids) for s in sampled),
             "truncated": sum(s.truncated for s in sampled), "forced": sum(bool(s.forced) for s in sampled),
             "training_tokens": sum(len(s.prompt.ids) + len(s.response_ids) for s in samples),
             "squared_lengths": sum((len(s.prompt.ids) + len(s.response_ids)) ** 2 for s in samples),
             "loss_tokens": sum(sum(w) for w in weights),
             "vllm_logprob_gap": sum(abs(v - o) * w for s, ws in zip(samples, weights)
                                     for v, o, w in zip(s.vllm_logprobs, s.old_logprobs.tolist(), ws)),
             "clipped_low": 0.0, "clipped_high": 0.0, "kl": 0.0, **token_sums}
    total = sum_over_ranks(local, device)
    per_response = {k: total[k] / max(total["responses"], 1) for k in ("reward", "response_tokens", "truncated",
                                                                          "forced")}
    per_loss_token = {k: total[k] / max(total["loss_tokens"], 1) for k in ("clipped_low", "clipped_high", "entropy",
                                                                            "kl", "vllm_logprob_gap")}
    steps = max(taken["optimizer_steps"], 1)
    return {"reward_mean": per_response["reward"], "groups_all_equal": total["groups_all_equal"] / max(total["groups"], 1),
            "groups_trained": int(total["groups_trained"]), "response_length_mean": per_response["response_tokens"],
            "response_length_max": all_reduce_max(max((len(s.response_ids) for s in sampled), default=0), device),
            "truncation_rate": per_response["truncated"], "forced_exit_rate": per_response["forced"],
            "clip_low_frac": per_loss_token["clipped_low"], "clip_high_frac": per_loss_token["clipped_high"],
            "entropy": per_loss_token["entropy"], "kl": per_loss_token["kl"],
            "vllm_logprob_gap": per_loss_token["vllm_logprob_gap"], "loss": taken["loss"] / steps,
            "grad_norm": taken["grad_norm"] / steps, "optimizer_steps": taken["optimizer_steps"],
            "training_tokens": int(total["training_tokens"]), "squared_lengths": total["squared_lengths"]}


# --- what a run keeps to read ---------------------------------------------------------------------------------

def save_rollouts(groups: list[list[Sample]], path: str) -> None:
    """Every rank's responses of one rollout batch, one JSON line each, in one file (rank 0 writes it)."""
    write_jsonl_of_all_ranks(path, [
        {"prompt_id": s.prompt.record.id, "prompt": readable(s.prompt.record.messages), "response": s.text,
         "extracted": extract_answer(s.text), "gold": s.prompt.record.answer, "reward": s.reward,
         "advantage": s.advantage, "forced_exit": bool(s.forced), "truncated": s.truncated,
         "length": len(s.response_ids)} for group in groups for s in group])


def score_held_out(llm, records: list[Record], args, exit_ids, device) -> dict:
    """evaluate.py's protocol on --eval-data from the colocated engine: greedy, its prompt, its forced exit (the
    budget leaves min(256, a quarter of --max-response-length) tokens to answer) and its grading; each rank
    answers its share. Accuracy, mean output tokens and forced-exit rate over all ranks."""
    from evaluate import ANSWER_TOKENS, VLLMBackend, run_items
    mine = records[dist.get_rank()::dist.get_world_size()]
    budget = args.max_response_length - min(ANSWER_TOKENS, args.max_response_length // 4)
    items = run_items(VLLMBackend(llm, progress=False), mine, 1, 0.0, budget, args.max_response_length,
                      exit_ids) if mine else []
    total = sum_over_ranks({"n": len(items), "correct": sum(i["correct"][0] for i in items),
                            "tokens": sum(i["output_tokens"][0] for i in items),
                            "forced": sum(i["forced_exit"][0] for i in items)}, device)
    n = max(total["n"], 1)
    return {"eval_accuracy": total["correct"] / n, "eval_response_length": total["tokens"] / n,
            "eval_forced_exit_rate": total["forced"] / n, "eval_n": int(total["n"])}


# --- setting up ---------------------------------------------------------------------------------------------

def load_prompts(args, tokenizer) -> tuple[list[Prompt], list[Record], object, int]:
    """The training prompts (longer ones than --max-prompt-length dropped, and counted), the held-out records,
    the image processor where a prompt has images, and the most images in one prompt (the engine's limit)."""
    from data.records import DataError
    from engine import load_image_processor
    records = load_records(args.data, args.data_format, args.data_split, style="train")
    held_out = load_records(args.eval_data, style="eval") if args.eval_data else []
    for path, rows in ((args.data, records), (args.eval_data, held_out)):
        missing = next((i for i, r in enumerate(rows) if r.answer is None or not str(r.answer).strip()), None)
        if missing is not None:
            raise DataError(f"{path}: row {missing}: no gold answer (id {rows[missing].id}); RL needs one per prompt")
    with_images = next((i for i, r in enumerate(records) if image_refs(r.messages)), None)
    image_processor = None if with_images is None else load_image_processor(
        args.model, f"{args.data}: row {with_images} (id {records[with_images].id})", args.trust_remote_code)
    prompts = [Prompt(r, *encode_prompt(tokenizer, image_processor, r.messages)) for r in records]
    kept = [p for p in prompts if len(p.ids) <= args.max_prompt_length]
    if dist.get_rank() == 0:
        print(f"data: {len(kept)} prompts ({sum(p.image_grid_thw is not None for p in kept)} with images, "
              f"{len(prompts) - len(kept)} over --max-prompt-length dropped)" +
              (f"; {len(held_out)} held-out prompts" if held_out else ""))
    return kept, held_out, image_processor, max((len(image_refs(r.messages)) for r in records + held_out), default=0)


def load_reference(args, policy, images: bool, device):
    """The frozen starting model the KL term is taken against, sharded as the policy (sharing its frozen tower)."""
    from training import load_model, shard_model, vision_tower, vision_trains
    reference = load_model(args.model, images_in_batches=images, trust_remote_code=args.trust_remote_code,
                           activation_checkpointing=False, attn_implementation=args.attn_implementation)
    if vision_tower(reference) is not None and not vision_trains(policy):
        reference.model.visual = vision_tower(policy)
    return shard_model(reference, device, images).requires_grad_(False).eval()


def start_engine(args, model, images: int, exit_ids):
    """This rank's colocated vLLM engine, in this process (in-place weight reloads) and asleep while training
    on GPU; the forced-exit processor only where a budget applies (--think-budget, or --eval-data's)."""
    from engine import make_llm, on_gpu
    from training import vision_tower
    # a VLM's engine reserves memory for as many images per prompt as the prompts have (text: the KV cache gets it)
    image_limit = {"limit_mm_per_prompt": {"image": images, "video": 0}} if vision_tower(model) is not None else {}
    return make_llm(args.model, max_model_len=args.max_prompt_length + args.max_response_length, seed=args.seed,
                    in_process=True, external_launcher=on_gpu(), enable_sleep_mode=on_gpu(),
                    gpu_memory_utilization=args.gpu_memory_utilization,
                    exit_ids=exit_ids if args.think_budget is not None or args.eval_data else None,
                    # log-probs after temperature, as the trainer's: the gap then measures the weight sync
                    logprobs_mode="processed_logprobs", **image_limit)


# --- training -----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: in-place reloads
    from transformers import AutoTokenizer

    from data.grading import start_grading_workers
    from engine import lent_to_the_trainer, require_model, shutdown_llm, sync_check, sync_weights, vllm_request
    from training import (MetricsLog, Progress, Timer, describe_setup, export_model, init_distributed, load_checkpoint,
                          load_model, memory_in_use_gib, mfu_meter, peak_memory_gib, record_trainer_run,
                          refuse_stale_checkpoints, save_checkpoint, seed_everything, shard_model, step_indices,
                          vision_tower)

    require_model(args.model, trust_remote_code=args.trust_remote_code)
    rank, world, device = init_distributed()
    if not args.resume:
        refuse_stale_checkpoints(args.output_dir)
    record_trainer_run("grpo", args, ("model", "data", "data_format", "data_split", "seed", "global_batch_size",
                                      "group_size", "train"))
    start_grading_workers(args.grading_workers, args.grading_timeout)  # they import math-verify while we load
    seed_everything(args.seed)
    if args.global_batch_size % world:
        raise SystemExit(f"error: --global-batch-size {args.global_batch_size} must be a multiple of the world size {world}")
    per_rank = args.global_batch_size // world

    # data: prompts with gold answers, laid out as the model's processor (and vLLM) lays them out
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    exit_ids = tokenizer.encode(args.exit_text, add_special_tokens=False)
    prompts, held_out, image_processor, images = load_prompts(args, tokenizer)
    steps_per_epoch = len(prompts) // args.global_batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {args.data}: {len(prompts)} usable prompts, fewer than one batch ({args.global_batch_size})")
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)

    # the policy (FSDP2), its optimizer, the frozen reference, and the colocated engine
    model = shard_model(load_model(args.model, train=args.train, images_in_batches=images > 0,
                                   trust_remote_code=args.trust_remote_code,
                                   activation_checkpointing=args.activation_checkpointing,
                                   attn_implementation=args.attn_implementation), device, images > 0)
    args.layout = args.layout or layout_for(model.config._attn_implementation)
    if rank == 0:
        print(describe_setup(model, args.model, world, device, args.layout, args.train))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, round(args.warmup_ratio * total_steps * args.mini_batches))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    reference = load_reference(args, model, images > 0, device) if args.kl_coef > 0 else None
    start_step = 0
    if args.resume and (checkpoint := latest_checkpoint(args.output_dir)):
        start_step = load_checkpoint(checkpoint, model, optimizer, scheduler)["step"]
        if rank == 0:
            print(f"resumed from {checkpoint} at step {start_step}")
    metrics = MetricsLog(args.output_dir, rank, args.wandb_project, vars(args), resume_step=start_step)
    llm = start_engine(args, model, images, exit_ids)
    if start_step > 0:
        sync_weights(llm, model)
    placeholder_ids = [model.config.image_token_id, model.config.video_token_id] if vision_tower(model) else []
    mfu = mfu_meter(model, world)

    model.train()
    progress = Progress("grpo", start_step, total_steps, rank, args.log_every)
    for step in range(start_step, total_steps):
        timer, memory = Timer(), {}
        # 1. sample: a group of --group-size responses to each of this rank's prompts
        indices = step_indices(len(prompts), args.global_batch_size, step, steps_per_epoch, args.seed)
        groups = rollout(llm, [prompts[i] for i in indices[rank * per_rank:(rank + 1) * per_rank]], args, step,
                         exit_ids, tokenizer, rank * per_rank, placeholder_ids)
        memory["rollout"] = memory_in_use_gib(device)
        timer.lap("rollout")
        with lent_to_the_trainer(llm, model):  # the engine sleeps; it wakes holding the new weights
            # 2. grade, and 3. advantages within each group
            trained = grade_groups(groups, args)
            timer.lap("grading")
            # 4. cut into --mini-batches, with the log-probs the update compares with
            mini_batches = split_mini_batches([s for group in trained for s in group], args.mini_batches,
                                              args.seed + step)
            entropy = comparison_logprobs(model, reference, mini_batches, args, device, image_processor)
            # 5. one optimizer step per mini-batch
            taken, token_sums = update(model, optimizer, scheduler, params, mini_batches, args, step, device,
                                       image_processor)
            token_sums["entropy"] += entropy
            timer.lap("training")
            memory["training"] = memory_in_use_gib(device)
        timer.lap("sync")  # 6. the new weights into the engine
        memory["wake"] = memory_in_use_gib(device)

        # 7. log, and what a run keeps
        row = {"step": step + 1, "epoch": step // steps_per_epoch,
               **step_metrics(groups, trained, taken, token_sums, args, device), "lr": scheduler.get_last_lr()[0],
               "peak_memory_gib": peak_memory_gib(device), **{f"memory_{k}_gib": v for k, v in memory.items()},
               **{f"seconds_{k}": v for k, v in timer.laps.items()}, "seconds": timer()}
        row["tokens_per_s"] = row["training_tokens"] / row["seconds_training"]
        squared_lengths = row.pop("squared_lengths")
        if mfu:  # a training forward and backward, the reference's forward, and the later mini-batches' old one
            row["mfu"] = mfu(row["training_tokens"], squared_lengths, row["seconds_training"],
                             (args.kl_coef > 0) + (args.mini_batches - 1) / args.mini_batches)
        if args.sync_check:  # the batch's first prompt on every rank: the same forwards, so FSDP's collectives match
            first = prompts[indices[0]]
            row["sync_greedy_match"], row["sync_logprob_gap"] = sync_check(
                llm, model, vllm_request(tokenizer, first.record.messages, {}), first.ids, first.images,
                first.image_grid_thw, image_processor, device)
        if held_out and ((step + 1) % args.eval_every == 0 or step + 1 == total_steps):
            row.update(score_held_out(llm, held_out, args, exit_ids, device))
        if args.save_rollouts_every and (step + 1) % args.save_rollouts_every == 0:
            save_rollouts(groups, os.path.join(args.output_dir, "rollouts", f"step_{step + 1:08d}.jsonl"))
        metrics.log(row)
        progress.step(row, reward=f"{row['reward_mean']:.3f}", clip_hi=f"{row['clip_high_frac']:.3f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(args.output_dir, step + 1, model, optimizer, scheduler, {}, args.keep_checkpoints)

    progress.close()
    if start_step < total_steps and args.final_checkpoint:
        save_checkpoint(args.output_dir, total_steps, model, optimizer, scheduler, {}, args.keep_checkpoints)
    export_model(model, args.model, os.path.join(args.output_dir, "model"), args.trust_remote_code)
    if rank == 0:
        print(f"exported {os.path.join(args.output_dir, 'model')}")
    shutdown_llm(llm)  # vLLM tears down its own groups; it must go before the default group does
    metrics.close()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_script(main)
    exit_without_teardown()
