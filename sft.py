"""Stage 1 of X-Reasoner: long chain-of-thought SFT on text only (paper §2.1, App. B.1).

    torchrun --nproc_per_node 8 sft.py --model Qwen/Qwen2.5-VL-7B-Instruct \\
        --data open-thoughts/OpenThoughts-114k --output-dir runs/sft

Full fine-tuning with a hand-written FSDP2 loop. Defaults are the paper's: AdamW lr 1e-5, betas
(0.9, 0.999), no weight decay, 4 epochs, lr x0.8 after each epoch, 128 sequences per step, 4,096
tokens per sequence. The loss is on assistant tokens only, summed over the whole global batch and
divided by its number of target tokens, so it does not depend on how the batch is split across
ranks and micro-batches. The recipe is text only; records with images (paths or PIL images in their
messages) train a VLM on them as its processor lays them out (`make demo` does, for its "instruct"
model). Outputs: OUT/metrics.jsonl, OUT/checkpoints/step_*/ (sharded, resumable
with --resume), OUT/model/ (save_pretrained; loads in transformers and vLLM).
"""
from __future__ import annotations

import argparse
import math
import os
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import add_data_arguments, assistant_target, load_records, run_script
from data.prompts import image_refs
from engine import encode_prompt, load_image_processor
from packing import collate_sequences, layout_for, micro_batches, target_logprobs
from training import (MetricsLog, Timer, add_trainer_arguments, all_reduce_sum, as_many_on_every_rank, count_params,
                      describe_setup, exit_without_teardown, export_model, init_distributed, latest_checkpoint,
                      load_checkpoint, load_model, peak_flops, peak_memory_gib, refuse_stale_checkpoints,
                      save_checkpoint, seed_everything, shard_model, step_indices, train_flops)

IGNORE = -100


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model: directory or hub id (paper: Qwen2.5-VL-7B-Instruct)")
    add_data_arguments(p, "training data")
    p.add_argument("--output-dir", required=True, help="metrics, checkpoints and the exported model go here")
    p.add_argument("--epochs", type=int, default=4, help="passes over the data (paper: 4)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (paper: 1e-5)")
    p.add_argument("--lr-decay", type=float, default=0.8, help="learning rate multiplier after each epoch (paper: 0.8)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (paper: none; default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (paper: 0)")
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas (paper: 0.9 0.999)")
    p.add_argument("--max-grad-norm", type=float, default=0.0,
                   help="gradient clipping norm; 0 = off (paper: not stated; the norm is logged either way)")
    p.add_argument("--global-batch-size", type=int, default=128, help="sequences per optimizer step (paper: 128)")
    p.add_argument("--max-tokens-per-micro-batch", type=int, default=16384,
                   help="tokens per forward pass and rank, padding included (default 16,384: the paper's 4 "
                        "sequences x 4,096, which fits a 7B on 80 GB GPUs with activation checkpointing: "
                        "bench/memory.py). It bounds memory; speed barely depends on it (padded rows split by cost, "
                        "see --layout)")
    p.add_argument("--max-length", type=int, default=4096, help="tokens per sequence, prompt included (paper: 4096)")
    p.add_argument("--long-examples", choices=["truncate", "drop"], default="truncate",
                   help="over-length examples: cut at --max-length (default, as the paper) or drop them")
    p.add_argument("--no-cot", action="store_true",
                   help="train on the answer alone, <answer>...</answer> (the non-CoT ablation of Table 1)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip rows that fail to load (default: stop)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (smoke runs, tests)")
    p.add_argument("--seed", type=int, default=0, help="data order and initialisation seed")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every K steps (and at the end); 0 = end only")
    add_trainer_arguments(p)
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


def lr_multiplier(step: int, steps_per_epoch: int, warmup_steps: int, decay: float) -> float:
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return warmup * decay ** (step // steps_per_epoch)


# --- training ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed()
    if not args.resume:
        refuse_stale_checkpoints(args.output_dir)
    seed_everything(args.seed)
    if args.global_batch_size % world:
        raise SystemExit(f"error: --global-batch-size {args.global_batch_size} must be a multiple of the world size "
                         f"{world}")

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    bad_rows = [] if args.skip_bad_rows else None
    records = load_records(args.data, args.data_format, args.data_split, style="train", bad_rows=bad_rows)
    image_processor = None
    with_images = [i for i, r in enumerate(records) if image_refs(r.messages)]
    if with_images:
        image_processor = load_image_processor(args.model, f"{args.data}: row {with_images[0]} (id "
                                               f"{records[with_images[0]].id})", args.trust_remote_code)
    examples, skipped = tokenize(records, tokenizer, args, image_processor)
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
              f"{total_steps} steps" + (f"\nfirst bad row: {bad_rows[0]}" if bad_rows else ""))

    images = any(e.images for e in examples)
    model = load_model(args.model, train=args.train, images_in_batches=images,
                       trust_remote_code=args.trust_remote_code, activation_checkpointing=args.activation_checkpointing,
                       attn_implementation=args.attn_implementation)
    text_config = getattr(model.config, "text_config", model.config)
    n_params = count_params(model) - model.get_input_embeddings().weight.numel()
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
        state = load_checkpoint(checkpoint, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        if state["num_examples"] != len(examples):
            raise SystemExit(f"error: {checkpoint} was trained on {state['num_examples']} examples, "
                             f"the data now gives {len(examples)}")
        start_step = state["step"]
        if rank == 0:
            print(f"resumed from {checkpoint} at step {start_step} (epoch {start_step // steps_per_epoch})")
    os.makedirs(args.output_dir, exist_ok=True)
    metrics = MetricsLog(args.output_dir, rank, args.wandb_project, vars(args), resume_step=start_step)
    peak = peak_flops()
    per_rank = args.global_batch_size // world

    model.train()
    progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=rank != 0,
                    desc="sft")
    for step in progress:
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
        if peak:
            flops = train_flops(n_params, text_config.num_hidden_layers, text_config.hidden_size, totals[0], totals[1])
            row["mfu"] = flops / (seconds * world * peak)
        metrics.log(row)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(args.output_dir, step + 1, model, optimizer,
                            {"scheduler": scheduler.state_dict(), "num_examples": len(examples)}, args.keep_checkpoints)

    if start_step < total_steps:
        save_checkpoint(args.output_dir, total_steps, model, optimizer,
                        {"scheduler": scheduler.state_dict(), "num_examples": len(examples)}, args.keep_checkpoints)
    export_model(model, args.model, os.path.join(args.output_dir, "model"), args.trust_remote_code)
    if rank == 0:
        print(f"exported {os.path.join(args.output_dir, 'model')}")
    metrics.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_script(main)
    exit_without_teardown()
