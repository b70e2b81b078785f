"""Stage 1 of X-Reasoner: long chain-of-thought SFT on text only (paper §2.1, App. B.1).

    torchrun --nproc_per_node 8 sft.py --model Qwen/Qwen2.5-VL-7B-Instruct \\
        --data open-thoughts/OpenThoughts-114k --output-dir runs/sft

Full fine-tuning with a hand-written FSDP2 loop. Defaults are the paper's: AdamW lr 1e-5, betas
(0.9, 0.999), no weight decay, 4 epochs, lr x0.8 after each epoch, 128 sequences per step, 4,096
tokens per sequence. The loss is on assistant tokens only, summed over the whole global batch and
divided by its number of target tokens, so it does not depend on how the batch is split across
ranks and micro-batches. The recipe is text only; records with images (paths or PIL images in their
messages) train a VLM on them as its processor lays them out (`make demo` does, for its "instruct"
model). Outputs: OUT/run.json, OUT/metrics.jsonl (with --eval-data, the held-out loss every --eval-every
steps), OUT/checkpoints/step_*/ (sharded, resumable with --resume), OUT/model/ (save_pretrained; loads in
transformers and vLLM).
"""
from __future__ import annotations

import argparse
import math
import os
from typing import NamedTuple

import torch
import torch.distributed as dist

from data import add_data_arguments, assistant_target, load_records, run_script
from data.prompts import image_refs
from engine import encode_prompt, load_image_processor, require_model
from packing import collate_sequences, layout_for, micro_batches, target_logprobs
from training import (MetricsLog, Progress, Timer, add_trainer_arguments, all_reduce_sum, as_many_on_every_rank,
                      describe_setup, exit_without_teardown, export_model, init_distributed, latest_checkpoint,
                      load_checkpoint, load_model, mfu_meter, peak_memory_gib, record_trainer_run,
                      refuse_stale_checkpoints, save_checkpoint, seed_everything, shard_model, step_indices)

IGNORE = -100


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--model", required=True, help="base model: directory or hub id (paper: Qwen2.5-VL-7B-Instruct)")
    add_data_arguments(data, "training data")
    data.add_argument("--max-length", type=int, default=4096, help="tokens per sequence, prompt included (paper: 4096)")
    data.add_argument("--long-examples", choices=["truncate", "drop"], default="truncate",
                      help="over-length examples: cut at --max-length (default, as the paper) or drop them")
    data.add_argument("--no-cot", action="store_true",
                      help="train on the answer alone, <answer>...</answer> (the non-CoT ablation of Table 1)")
    data.add_argument("--skip-bad-rows", action="store_true", help="skip rows that fail to load (default: stop)")
    optimizer = p.add_argument_group("optimizer")
    optimizer.add_argument("--epochs", type=int, default=4, help="passes over the data (paper: 4)")
    optimizer.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (paper: 1e-5)")
    optimizer.add_argument("--lr-decay", type=float, default=0.8, help="lr multiplier after each epoch (paper: 0.8)")
    optimizer.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (paper: none; 0)")
    optimizer.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (paper: 0)")
    optimizer.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas (paper: 0.9 0.999)")
    optimizer.add_argument("--max-grad-norm", type=float, default=0.0,
                           help="gradient clipping norm; 0 = off (paper: not stated; the norm is logged either way)")
    optimizer.add_argument("--global-batch-size", type=int, default=128, help="sequences per optimizer step (128)")
    optimizer.add_argument("--max-tokens-per-micro-batch", type=int, default=16384,
                           help="tokens per forward and rank, padding included (default 16,384: 4 x 4,096)")
    run = add_trainer_arguments(p)
    run.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (smoke runs, tests)")
    run.add_argument("--seed", type=int, default=0, help="data order and initialisation seed")
    run.add_argument("--save-every", type=int, default=200, help="checkpoint every K steps; 0 = never")
    run.add_argument("--eval-data", help="held-out examples: their loss (the training objective) is logged")
    run.add_argument("--eval-every", type=int, default=200, help="steps between held-out losses (default 200)")
    return p.parse_args(argv)


# --- data ------------------------------------------------------------------------------------------------

class Example(NamedTuple):
    ids: list[int]
    labels: list[int]  # the next token on assistant tokens, IGNORE elsewhere
    images: list  # image files (or PIL images), read again when the example is batched
    image_grid_thw: torch.Tensor | None  # [images, 3] patches per image (Qwen2.5-VL)


def tokenize(records, tokenizer, args, image_processor=None):
    """Examples and the counts of records skipped or cut. A VLM's image prompts get one <|image_pad|> per
    merged patch of each image, as the model's processor lays them out."""
    examples, skipped = [], {"no_target": 0, "too_long_dropped": 0, "truncated": 0}
    for record in records:
        if not record.target_answer or (not args.no_cot and not record.target_think):
            skipped["no_target"] += 1
            continue
        prompt_ids, grid = encode_prompt(tokenizer, image_processor, record.messages)
        target = assistant_target(None if args.no_cot else record.target_think, record.target_answer)
        target_ids = tokenizer.encode(target + tokenizer.eos_token, add_special_tokens=False)
        ids = prompt_ids + target_ids
        if len(ids) > args.max_length:
            # an image's tokens are all there or the image cannot be placed: such a cut drops the example
            if args.long_examples == "drop" or (grid is not None and len(prompt_ids) > args.max_length):
                skipped["too_long_dropped"] += 1
                continue
            skipped["truncated"] += 1
            ids = ids[:args.max_length]
        is_target = [False] * len(prompt_ids) + [True] * len(target_ids)
        labels = [ids[t + 1] if t + 1 < len(ids) and is_target[t + 1] else IGNORE for t in range(len(ids))]
        examples.append(Example(ids, labels, image_refs(record.messages), grid))
    return examples, skipped


def collate(examples, layout: str = "packed", model=None, image_processor=None):
    """A micro-batch in the layout (packing.pack); the targets are the labelled (assistant) positions. With
    images, their pixels and grids for the vision tower and each image sequence's mrope positions."""
    targets = [[(t, label) for t, label in enumerate(e.labels) if label != IGNORE] for e in examples]
    return collate_sequences([e.ids for e in examples], targets, layout, [e.images for e in examples],
                             [e.image_grid_thw for e in examples], model, image_processor)


def summed_token_loss(model, batch: dict, device) -> torch.Tensor:
    """Cross-entropy summed over the micro-batch's target tokens."""
    logprobs, _ = target_logprobs(model, batch, device)
    return -logprobs.sum()


@torch.no_grad()
def held_out_loss(model, examples, args, layout: str, device, image_processor=None) -> float:
    """The training objective on held-out examples: their summed token loss over all ranks (each takes every
    world-th example) divided by their target tokens."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = examples[rank::world]
    model.eval()
    loss_sum = 0.0
    for group in as_many_on_every_rank(micro_batches([len(e.ids) for e in mine], args.max_tokens_per_micro_batch,
                                                     layout), device):
        loss_sum += summed_token_loss(model, collate([mine[i] for i in group], layout, model, image_processor),
                                      device).item()
    model.train()
    targets = sum(sum(1 for t in e.labels if t != IGNORE) for e in mine)
    loss_sum, targets = all_reduce_sum(torch.tensor([loss_sum, targets]), device).tolist()
    return loss_sum / max(targets, 1.0)


def lr_multiplier(step: int, steps_per_epoch: int, warmup_steps: int, decay: float) -> float:
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return warmup * decay ** (step // steps_per_epoch)


# --- training ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    require_model(args.model, trust_remote_code=args.trust_remote_code)
    rank, world, device = init_distributed()
    if not args.resume:
        refuse_stale_checkpoints(args.output_dir)
    record_trainer_run("sft", args, ("model", "data", "data_format", "data_split", "seed", "global_batch_size",
                                     "max_length", "long_examples", "no_cot", "train"))
    seed_everything(args.seed)
    if args.global_batch_size % world:
        raise SystemExit(f"error: --global-batch-size {args.global_batch_size} must be a multiple of the world size "
                         f"{world}")

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    bad_rows = [] if args.skip_bad_rows else None
    records = load_records(args.data, args.data_format, args.data_split, style="train", bad_rows=bad_rows)
    held_out = load_records(args.eval_data, style="train") if args.eval_data else []
    image_processor = None
    with_images = [(path, i, r) for path, rows in ((args.data, records), (args.eval_data, held_out))
                   for i, r in enumerate(rows) if image_refs(r.messages)]
    if with_images:
        path, index, record = with_images[0]
        image_processor = load_image_processor(args.model, f"{path}: row {index} (id {record.id})",
                                               args.trust_remote_code)
    examples, skipped = tokenize(records, tokenizer, args, image_processor)
    eval_examples, _ = tokenize(held_out, tokenizer, args, image_processor)
    steps_per_epoch = len(examples) // args.global_batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {args.data}: {len(examples)} usable examples, fewer than one global batch "
                         f"({args.global_batch_size})")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    if rank == 0:
        print(f"data: {len(records)} rows loaded, {len(bad_rows or [])} bad rows skipped, "
              f"{skipped['no_target']} without a target, {skipped['too_long_dropped']} over-length dropped, "
              f"{skipped['truncated']} truncated; {len(examples)} examples, {steps_per_epoch} steps per epoch, "
              f"{total_steps} steps" + (f"; {len(eval_examples)} held-out examples" if held_out else "") +
              (f"\nfirst bad row: {bad_rows[0]}" if bad_rows else ""))

    images = any(e.images for e in examples + eval_examples)
    model = load_model(args.model, train=args.train, images_in_batches=images,
                       trust_remote_code=args.trust_remote_code, activation_checkpointing=args.activation_checkpointing,
                       attn_implementation=args.attn_implementation)
    model = shard_model(model, device, images)
    layout = args.layout or layout_for(model.config._attn_implementation)
    if rank == 0:
        print(describe_setup(model, args.model, world, device, layout, args.train))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(
        s, steps_per_epoch, args.warmup_steps, args.lr_decay))

    start_step = 0
    if args.resume and (checkpoint := latest_checkpoint(args.output_dir)):
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        if state["num_examples"] != len(examples):
            raise SystemExit(f"error: {checkpoint} was trained on {state['num_examples']} examples, "
                             f"the data now gives {len(examples)}")
        start_step = state["step"]
        if rank == 0:
            print(f"resumed from {checkpoint} at step {start_step} (epoch {start_step // steps_per_epoch})")
    metrics = MetricsLog(args.output_dir, rank, args.wandb_project, vars(args), resume_step=start_step)
    mfu = mfu_meter(model, world)
    per_rank = args.global_batch_size // world

    model.train()
    progress = Progress("sft", start_step, total_steps, rank, args.log_every)
    for step in range(start_step, total_steps):
        timer = Timer()
        indices = step_indices(len(examples), args.global_batch_size, step, steps_per_epoch, args.seed)
        mine = [examples[i] for i in indices[rank * per_rank:(rank + 1) * per_rank]]
        local_targets = sum(sum(1 for t in e.labels if t != IGNORE) for e in mine)
        global_targets = all_reduce_sum(local_targets, device).item()
        loss_sum, computed_tokens = 0.0, 0
        groups = micro_batches([len(e.ids) for e in mine], args.max_tokens_per_micro_batch, layout)
        for group in as_many_on_every_rank(groups, device):
            batch = collate([mine[i] for i in group], layout, model, image_processor)
            computed_tokens += batch["input_ids"].numel()
            token_loss = summed_token_loss(model, batch, device)
            # FSDP averages gradients over ranks: scale by world / global count to get the global token mean.
            (token_loss * world / max(global_targets, 1.0)).backward()
            loss_sum += token_loss.item()
        loss = all_reduce_sum(loss_sum, device).item() / max(global_targets, 1.0)
        if not math.isfinite(loss):
            raise SystemExit(f"error: step {step + 1}: the loss is {loss}; stopping without saving a checkpoint "
                             f"from this state (the last good one: {latest_checkpoint(args.output_dir)})")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
        grad_norm = grad_norm.full_tensor().item() if hasattr(grad_norm, "full_tensor") else grad_norm.item()
        lr = scheduler.get_last_lr()[0]
        if global_targets > 0:  # a batch whose targets were all truncated away teaches nothing
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        lengths = [len(e.ids) for e in mine]
        totals = all_reduce_sum(torch.tensor([sum(lengths), sum(s * s for s in lengths), computed_tokens],
                                             dtype=torch.float64), device).tolist()
        seconds = timer()
        row = {"step": step + 1, "epoch": step // steps_per_epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "target_tokens": int(global_targets), "tokens_per_s": totals[0] / seconds, "seconds": seconds,
               "padding_fraction": 1 - totals[0] / totals[2],
               "peak_memory_gib": peak_memory_gib(device)}
        if mfu:
            row["mfu"] = mfu(totals[0], totals[1], seconds)
        if eval_examples and ((step + 1) % args.eval_every == 0 or step + 1 == total_steps):
            row["eval_loss"] = held_out_loss(model, eval_examples, args, layout, device, image_processor)
        metrics.log(row)
        progress.step(row, loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(args.output_dir, step + 1, model, optimizer, scheduler, {"num_examples": len(examples)},
                            args.keep_checkpoints)

    progress.close()
    if start_step < total_steps and args.final_checkpoint:
        save_checkpoint(args.output_dir, total_steps, model, optimizer, scheduler, {"num_examples": len(examples)},
                        args.keep_checkpoints)
    export_model(model, args.model, os.path.join(args.output_dir, "model"), args.trust_remote_code)
    if rank == 0:
        print(f"exported {os.path.join(args.output_dir, 'model')}")
    metrics.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_script(main)
    exit_without_teardown()
