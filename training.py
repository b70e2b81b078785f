"""Mechanics shared by sft.py and grpo.py: process group, model loading and FSDP2 sharding,
checkpoints (save / resume / export), metrics. Each function does one thing; the stages read top
to bottom and call these where the recipe needs them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from engine import on_gpu
from packing import ATTN_IMPLEMENTATIONS, LAYOUTS, VARLEN, flash_attn_installed, use_varlen_attention

CHECKPOINT_DIR = "checkpoints"
# Ranks wait at collectives while others finish a rollout batch (up to 4,096 tokens x 8 x 16 prompts each
# on the paper's settings) or save a checkpoint: far past NCCL's default 10 minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def add_trainer_arguments(parser):
    """The flags sft.py and grpo.py share word for word, in two groups: model (what trains, and how it computes)
    and run (outputs, checkpoints, logging). Returns the run group, for each stage's own run flags."""
    model = parser.add_argument_group("model")
    model.add_argument("--train", type=model_parts, default=frozenset({"language"}), metavar="PARTS",
                       help="parts that train, from language, projector (a VLM's merger), vision (its tower); the rest "
                            "is frozen (default language: the paper's frozen vision encoder)")
    model.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                       help="recompute each layer's activations in backward (default: on with GPUs, off on CPU)")
    model.add_argument("--attn-implementation", choices=ATTN_IMPLEMENTATIONS,
                       help="varlen (default on GPU: packed rows, flash-attn's or torch's varlen kernel), "
                            "flash_attention_2 (transformers' path), sdpa (default on CPU) or eager")
    model.add_argument("--layout", choices=LAYOUTS,
                       help="micro-batch layout: packed (one row) or padded (rows by length); default: the one that "
                            "suits the attention implementation")
    model.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model dir")
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", required=True,
                     help="run.json, metrics, checkpoints and the exported model go here")
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    run.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept on disk (default 2)")
    run.add_argument("--final-checkpoint", action=argparse.BooleanOptionalAction, default=True,
                     help="checkpoint at the end too, so that --resume can extend the run (default on)")
    run.add_argument("--log-every", type=int, default=1,
                     help="steps between plain log lines when stdout is not a terminal (default 1)")
    run.add_argument("--wandb-project", help="also log to this wandb project (needs wandb installed)")
    return run


def record_trainer_run(stage: str, args, must_match: tuple[str, ...]) -> None:
    """OUT/run.json (provenance.py), every process's host and device in it; a --resume that cannot continue the
    run stops every rank in one line."""
    from provenance import describe_run, host_device, record_run

    devices = [None] * dist.get_world_size()
    dist.all_gather_object(devices, host_device())
    refusal = [None]
    if dist.get_rank() == 0:
        continuing = args.resume and latest_checkpoint(args.output_dir) is not None
        try:
            record_run(os.path.join(args.output_dir, "run.json"), describe_run(stage, args, devices), continuing,
                       ("world_size", *must_match))
        except SystemExit as exc:
            refusal[0] = str(exc.code)
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0]:
        raise SystemExit(refusal[0])


# --- processes ---------------------------------------------------------------------------------------

def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Works under torchrun and as a plain single process (world 1)."""
    group_args = {}
    if "RANK" not in os.environ:  # a plain `python sft.py`: a one-process group, so one code path serves all
        # on a port the OS picks: a fixed or pid-derived one can be held already (by an outgoing connection,
        # another run), and the run then dies with EADDRINUSE
        tcp_store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=COLLECTIVE_TIMEOUT)
        group_args = {"store": tcp_store, "rank": 0, "world_size": 1}
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(tcp_store.port))
    if on_gpu():
        # fewer fragments in a memory shared with vLLM's engine (which turns this off inside its own pool)
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=COLLECTIVE_TIMEOUT, **group_args)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT, **group_args)
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce_sum(value: float | torch.Tensor, device) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64, device=device).clone()
    dist.all_reduce(tensor)
    return tensor


def sum_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    """Named values summed over ranks in one all-reduce (every rank passes the same names)."""
    names = sorted(values)
    totals = all_reduce_sum(torch.tensor([float(values[n]) for n in names], dtype=torch.float64), device).tolist()
    return dict(zip(names, totals))


def write_jsonl_of_all_ranks(path: str, rows: list[dict]) -> None:
    """Every rank's rows gathered into one JSONL file, written by rank 0 (whole, or not at all). Collective."""
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(rows, gathered, dst=0)
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(f"{path}.tmp", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for rank_rows in gathered for row in rank_rows)
        os.replace(f"{path}.tmp", path)


def all_reduce_max(value: float, device) -> float:
    tensor = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def as_many_on_every_rank(micro_batches: list[list], device) -> list[list]:
    """FSDP runs collectives in every forward and backward, so every rank must run as many micro-batches;
    token budgets cut ranks' shares into different numbers. A rank with fewer runs empty ones."""
    if not dist.is_initialized():  # one process, no group (a library call): nothing to match
        return micro_batches
    count = int(all_reduce_max(len(micro_batches), device))
    return micro_batches + [[] for _ in range(count - len(micro_batches))]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_indices(num_examples: int, global_batch: int, step: int, steps_per_epoch: int, seed: int) -> list[int]:
    """The examples of one optimizer step: a fresh permutation per epoch, a contiguous slice per step."""
    epoch, position = divmod(step, steps_per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch))
    return order[position * global_batch:(position + 1) * global_batch].tolist()


# --- the model ---------------------------------------------------------------------------------------

MODEL_PARTS = ("language", "projector", "vision")


def model_parts(text: str) -> frozenset[str]:
    """--train's value: a comma-separated set of MODEL_PARTS."""
    parts = frozenset(part.strip() for part in text.split(",") if part.strip())
    if not parts or parts - set(MODEL_PARTS):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated choice of {', '.join(MODEL_PARTS)}")
    return parts


def is_vision_param(name: str) -> bool:
    """A parameter of a VLM's vision tower, its merger included."""
    return ".visual." in f".{name}" or name.startswith("visual.")


def model_part(name: str) -> str:
    """The part a parameter belongs to: "projector" (Qwen2.5-VL: visual.merger), "vision" (the rest of the
    vision tower) or "language" (everything else: embeddings, decoder, lm_head)."""
    if not is_vision_param(name):
        return "language"
    return "projector" if ".merger." in f".{name}" else "vision"


def default_attn_implementation() -> str:
    """varlen on GPUs (packed rows, with or without flash-attn), sdpa on CPU (padded rows)."""
    return VARLEN if on_gpu() else "sdpa"


def load_model(path: str, *, train: frozenset[str] = frozenset({"language"}), images_in_batches: bool = False,
               activation_checkpointing: bool | None = None, attn_implementation: str | None = None,
               trust_remote_code: bool = False):
    """The policy in fp32 master weights (FSDP casts to bf16 for compute on GPU); only the parts in train
    (MODEL_PARTS) require gradients. `model(..., targets=...)` gives target log-probabilities without full
    logits (packing.install_target_logprobs). images_in_batches: some micro-batches hold images (so, with a
    part of the vision tower training, every micro-batch runs the tower; text-only training never does).
    activation_checkpointing None: on with GPUs, off on CPU (--activation-checkpointing's default)."""
    from engine import load_hf_model
    from packing import install_target_logprobs

    attn_implementation = attn_implementation or default_attn_implementation()
    vision_attn_implementation = None
    if attn_implementation == VARLEN:  # the language model's; the vision tower attends per image already
        use_varlen_attention()
        vision_attn_implementation = "flash_attention_2" if flash_attn_installed() else "sdpa"
    model = load_hf_model(path, dtype=torch.float32, trust_remote_code=trust_remote_code,
                          attn_implementation=attn_implementation,
                          vision_attn_implementation=vision_attn_implementation)
    for name, param in model.named_parameters():
        param.requires_grad_(model_part(name) in train)
    if not any(p.requires_grad for p in model.parameters()):
        raise SystemExit(f"error: --train {','.join(sorted(train))}: {path} has no such part (a text model has "
                         "only language)")
    if "language" not in train and not images_in_batches:
        raise SystemExit(f"error: --train {','.join(sorted(train))} trains the vision side only, and the data has "
                         "no images: nothing would learn")
    if on_gpu() if activation_checkpointing is None else activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    install_target_logprobs(model, vision_in_every_forward=images_in_batches and vision_trains(model))
    return model


def describe_setup(model, path: str, world: int, device, layout: str, train: frozenset[str]) -> str:
    """The line a run prints about what it computes with: model, devices, kernel, layout, recompute, parts."""
    from packing import varlen_kernel_name
    checkpointing = "on" if model.is_gradient_checkpointing else "off"
    attention = model.config._attn_implementation
    if attention == VARLEN:
        attention += f" ({varlen_kernel_name()})"
    return (f"model: {path} on {world} x {device.type}, attention {attention}, layout {layout}, "
            f"activation checkpointing {checkpointing}, training {','.join(sorted(train))}")


def vision_trains(model) -> bool:
    """Whether any parameter of the vision tower (merger included) is trained."""
    return any(p.requires_grad for name, p in model.named_parameters() if is_vision_param(name))


def vision_tower(model):
    """A VLM's vision tower (Qwen2.5-VL: model.model.visual), or None for a text model."""
    inner = getattr(model, "model", None)
    return getattr(inner, "visual", None) or getattr(model, "visual", None)


def decoder_layers(model) -> list[torch.nn.Module]:
    for path in ("model.language_model.layers", "model.layers", "language_model.model.layers"):
        module = model
        try:
            for attr in path.split("."):
                module = getattr(module, attr)
            return list(module)
        except AttributeError:
            continue
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def cast_parameters(module, dtype) -> None:
    """Parameters only: module.to(dtype) would also cast buffers such as the rotary inv_freq, which vLLM
    keeps in fp32 (in bf16 they are off by up to 0.4%, and image features with them)."""
    for param in module.parameters():
        param.data = param.data.to(dtype)


def shard_model(model, device, images: bool = False):
    """FSDP2: one unit per decoder layer and the root; bf16 compute with fp32 gradient reduction on
    GPU, fp32 on CPU. Each unit's parameters move to the device as it is sharded (fully_shard moves what
    it manages: torch/distributed/fsdp/_fully_shard/_fsdp_init.py, _move_states_to_device), so no rank
    ever holds the whole fp32 model on its GPU. A vision tower with any trained parameter is a unit of its
    own, frozen and trained parameters together (with --train projector, its merger trains and its blocks
    do not). A frozen tower stays out of every unit (ignored, replicated: no rank waits on a collective
    that another rank skips): on the device in bf16 where batches hold images, else on the host, since
    text-only batches never run it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    vision = {p for n, p in model.named_parameters() if is_vision_param(n)}
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    if vision and vision_trains(model):
        fully_shard(vision_tower(model), mp_policy=mp)
        vision = set()
    elif vision and images:
        vision_tower(model).to(device)
        if device.type == "cuda":  # as FSDP computes
            cast_parameters(vision_tower(model), torch.bfloat16)
    fully_shard(model, mp_policy=mp, ignored_params=vision or None)
    return model


def count_params(model, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --- checkpoints ---------------------------------------------------------------------------------------

def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if on_gpu():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and on_gpu():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(output_dir: str, step: int, model, optimizer, scheduler, trainer_state: dict,
                    keep: int = 2) -> str:
    """A sharded DCP checkpoint of model and optimizer, with the scheduler, trainer_state (data position, ...)
    and every rank's RNG state. Written to a temporary folder and renamed when complete, so a crash mid-save
    leaves the previous checkpoint as the latest."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = os.path.join(output_dir, CHECKPOINT_DIR)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        torch.save({**trainer_state, "scheduler": scheduler.state_dict(), "step": step,
                    "world_size": dist.get_world_size()}, os.path.join(tmp, "trainer_state.pt"))
    dist.barrier()
    if rank == 0:
        os.replace(tmp, final)
        for old in sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return final


def refuse_stale_checkpoints(output_dir: str) -> None:
    """A fresh run must not write beside an earlier run's checkpoints: --resume would later pick theirs."""
    if latest_checkpoint(output_dir):
        raise SystemExit(f"error: {os.path.join(output_dir, CHECKPOINT_DIR)} holds an earlier run's checkpoints; "
                         "pass --resume to continue that run, or choose another --output-dir")


def latest_checkpoint(output_dir: str) -> str | None:
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return None
    done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
    return os.path.join(root, done[-1]) if done else None


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; return the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer_state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    if trainer_state["world_size"] != dist.get_world_size():
        raise SystemExit(f"error: {path} was written by {trainer_state['world_size']} processes; resume with the "
                         f"same number (got {dist.get_world_size()})")
    scheduler.load_state_dict(trainer_state["scheduler"])
    _set_rng_state(torch.load(os.path.join(path, f"rng_rank{dist.get_rank()}.pt"), weights_only=False))
    return trainer_state


def full_state_dict(model) -> dict:
    """The whole model's state dict gathered to CPU on rank 0 (empty on the others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_model(model, source: str, out_dir: str, trust_remote_code: bool = False, dtype=None) -> None:
    """save_pretrained (safetensors) with tokenizer and image-processor files, so transformers and
    vLLM load it as is. dtype: bf16 on GPU (the base model's), fp32 on CPU by default; the config says
    the dtype the weights are saved in. Collective: call on all ranks."""
    state = full_state_dict(model)
    if dist.get_rank() == 0:
        from transformers import AutoTokenizer

        dtype = dtype or (torch.bfloat16 if on_gpu() else torch.float32)
        state = {k: v.to(dtype) for k, v in state.items()}
        tmp = out_dir.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.config.use_cache = True
        model.save_pretrained(tmp, state_dict=state)
        # save_pretrained writes the dtype of the model's parameters (the fp32 masters), not of the state dict
        for config in (model.config, *(getattr(model.config, n, None) for n in ("text_config", "vision_config"))):
            if config is not None:
                config.dtype = dtype
        model.config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code).save_pretrained(tmp)
        if os.path.exists(os.path.join(source, "preprocessor_config.json")) or hasattr(model.config, "vision_config"):
            from transformers import AutoImageProcessor
            AutoImageProcessor.from_pretrained(source).save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    dist.barrier()


# --- logging --------------------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl in the output directory (rank 0), optionally mirrored to wandb."""

    def __init__(self, output_dir: str, rank: int, wandb_project: str | None = None, config: dict | None = None,
                 resume_step: int = 0):
        self.rank = rank
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.wandb = None
        if rank != 0:
            return
        if os.path.exists(self.path):  # drop lines past the checkpoint being resumed from
            with open(self.path) as fh:
                kept = [line for line in fh if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path, "w") as fh:
                fh.writelines(kept)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise SystemExit("error: --wandb-project given but wandb is not installed") from None
            self.wandb = wandb.init(project=wandb_project, config=config, resume="allow")

    def log(self, metrics: dict) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=metrics["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def exit_without_teardown() -> None:
    """End a training process whose work is saved. torch's DTensor caches keep the process group alive past
    destroy_process_group, and its gloo/NCCL threads are then destroyed at an arbitrary moment of
    interpreter exit, which now and then aborts a finished run ("terminate called without an active
    exception", exit -6). Files are closed by now; streams are flushed here, then os._exit skips that teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def peak_memory_gib(device) -> float:
    """Peak memory of this process so far: CUDA max allocated on GPU, resident set size (RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def memory_in_use_gib(device) -> float:
    """Memory in use now: the whole GPU's (vLLM's engine included, which the caching allocator's statistics
    do not see), or this process's resident set on CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return (total - free) / 2 ** 30
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


class Timer:
    """Seconds since it was made (timer()), and the seconds of each named part of that time (timer.lap(name): the
    time since the previous lap, kept in timer.laps)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def __call__(self) -> float:
        return time.perf_counter() - self.start

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now


class Progress:
    """Live progress on rank 0. On a terminal, tqdm's bar; elsewhere (torchrun into a file, a cluster job), where a
    bar is only carriage returns, one plain line every `every` steps: step, loss or reward, lr, tokens/s, MFU on
    GPU, seconds, peak memory, and a held-out score when the step has one."""

    FIELDS = (("loss", "loss {:.4f}"), ("reward_mean", "reward {:.3f}"), ("eval_loss", "held-out loss {:.4f}"),
              ("eval_accuracy", "held-out accuracy {:.3f}"), ("lr", "lr {:.2e}"), ("tokens_per_s", "{:,.0f} tokens/s"),
              ("mfu", "MFU {:.3f}"), ("seconds", "{:.2f} s"), ("peak_memory_gib", "{:.1f} GiB peak"))

    def __init__(self, stage: str, start: int, total: int, rank: int, every: int):
        self.stage, self.total, self.every, self.rank = stage, total, max(1, every), rank
        self.bar = tqdm(initial=start, total=total, desc=stage) if rank == 0 and sys.stdout.isatty() else None

    def step(self, row: dict, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(postfix)
            if any(key.startswith("eval_") for key in row):  # a held-out score stays on the screen
                self.bar.write(self.line(row))
        elif self.rank == 0 and (row["step"] % self.every == 0 or row["step"] == self.total):
            print(self.line(row), flush=True)

    def line(self, row: dict) -> str:
        return " | ".join([f"{self.stage} step {row['step']}/{self.total}"] +
                          [form.format(row[key]) for key, form in self.FIELDS if row.get(key) is not None])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10": 125.0, "L40": 181.0}


def peak_flops() -> float | None:
    """Dense bf16 peak of this GPU (datasheet), or None off GPU / for an unknown device."""
    if not on_gpu():
        return None
    name = torch.cuda.get_device_name()
    tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return tflops * 1e12 if tflops else None


def mfu_meter(model, world: int):
    """On GPU, a function (tokens, sum of squared sequence lengths, seconds, forward-only passes) -> the model FLOPs
    utilisation of a step over all ranks; None elsewhere. Counts the language model without its input embeddings."""
    peak = peak_flops()
    if not peak:
        return None
    text = getattr(model.config, "text_config", model.config)
    n_params = count_params(model) - model.get_input_embeddings().weight.numel()
    return lambda tokens, squared, seconds, forwards=0.0: train_flops(
        n_params, text.num_hidden_layers, text.hidden_size, tokens, squared, forwards) / (seconds * world * peak)


def train_flops(n_params: int, n_layers: int, hidden: int, tokens: float, sum_squared_lengths: float,
                forward_passes: float = 0.0) -> float:
    """FLOPs of one forward and backward over the tokens, plus forward_passes forwards without backward: 6 (and 2
    per forward) per parameter per token, plus causal attention (6, and 2 per forward, times L * H * s^2 per
    sequence)."""
    return (6.0 + 2.0 * forward_passes) * (n_params * tokens + n_layers * hidden * sum_squared_lengths)
