"""Memory of the loss path at the real vocabulary (152,064), measured on CPU, and the per-GPU arithmetic
for the paper's Qwen2.5-VL-7B settings.

    python bench/memory.py

1. One SFT step and one GRPO training step (old log-probs with entropy, then the clipped loss and its
   backward) of a narrow Qwen2 (hidden 128, 2 layers) with vocabulary 152,064 on 8,192 tokens in one
   micro-batch, each in a fresh process: peak RSS, and the step's own part (peak minus the RSS just before
   the step: model, data and the imported libraries excluded). "full logits" is the computation this project used
   before (fp32 [tokens, vocabulary] logits, cross-entropy, softmax x log-softmax for the entropy);
   "chunked" is packing.chunked_target_logprobs as sft.py and grpo.py run it now.
2. Per-GPU memory of the 7B recipe on 8 GPUs, from the model's own config (parameter counts of a model
   built on the meta device), with the defaults of sft.py and grpo.py.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._report import print_table  # noqa: E402
from tiny_models import QWEN2_5_VL_7B_CONFIG  # noqa: E402

VOCAB, TOKENS, SEQUENCES = 152_064, 8192, 8
GIB = 2 ** 30


# --- 1. measured -----------------------------------------------------------------------------------------

def measure(model_dir: str, stage: str, path: str) -> str:
    """Run one step in this process; return 'peak RSS, RSS before the step' in GiB."""
    import torch
    import torch.nn.functional as F

    from grpo import clipped_surrogate, token_sum_loss
    from packing import pack, target_logprobs
    from training import load_model, memory_in_use_gib
    model = load_model(model_dir, activation_checkpointing=False)
    torch.manual_seed(0)
    length = TOKENS // SEQUENCES
    sequences = [torch.randint(0, VOCAB, (length,)).tolist() for _ in range(SEQUENCES)]
    prompt = 64  # GRPO: the first 64 tokens of each sequence are the prompt; SFT: likewise, unlabelled
    batch = pack(sequences, [[(t, s[t + 1]) for t in range(prompt - 1, length - 1)] for s in sequences])

    def full_logits_logprobs(with_entropy=False):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["positions"]).logits[0].float()
        logits = logits[:-1]  # the old code projected every position, then picked the targets
        targets = batch["input_ids"][0, 1:]
        logprobs = -F.cross_entropy(logits, targets, reduction="none")
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        return logprobs[batch["target_index"]], entropy

    def logprobs_of(with_entropy=False):
        if path == "full logits":
            return full_logits_logprobs(with_entropy)
        return target_logprobs(model, batch, "cpu", with_entropy=with_entropy)

    before = memory_in_use_gib(torch.device("cpu"))
    if stage == "sft":
        (-logprobs_of()[0].sum()).backward()
    else:
        with torch.no_grad():
            old, entropy = logprobs_of(with_entropy=True)
        logprobs, _ = logprobs_of()
        advantages = torch.randn(len(logprobs))
        per_token, _, _ = clipped_surrogate(logprobs, old, advantages)
        loss = token_sum_loss(per_token, torch.ones_like(logprobs), len(logprobs))
        loss.backward()
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB} {before}"


def measured_table(work: str) -> list[dict]:
    from tiny_models import build_qwen2, build_tokenizer

    tokenizer = build_tokenizer(f"{work}/tok")
    model = build_qwen2(f"{work}/model", tokenizer, hidden_size=128, layers=2, vocab_size=VOCAB)
    rows = {}
    for stage in ("sft", "grpo"):
        for path in ("full logits", "chunked"):
            result = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", model, stage, path],
                                    capture_output=True,
                                    text=True, check=True)
            rows[stage, path] = [float(x) for x in result.stdout.strip().splitlines()[-1].split()]
    table = []
    for stage in ("sft", "grpo"):
        (full, full_before), (chunked, chunked_before) = rows[stage, "full logits"], rows[stage, "chunked"]
        table.append({"step": stage, "peak RSS, full logits (GiB)": full, "peak RSS, chunked (GiB)": chunked,
                      "ratio": full / chunked, "step's own, full logits (GiB)": full - full_before,
                      "step's own, chunked (GiB)": chunked - chunked_before,
                      "ratio, step's own": (full - full_before) / (chunked - chunked_before)})
    return table


# --- 2. arithmetic ------------------------------------------------------------------------------------------

def parameter_counts() -> tuple[int, int]:
    """(language model incl. embeddings and lm_head, vision tower incl. merger) of Qwen2.5-VL-7B."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config_dir = tempfile.mkdtemp()
    with open(f"{config_dir}/config.json", "w") as fh:
        json.dump(QWEN2_5_VL_7B_CONFIG, fh)
    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    return sum(p.numel() for p in model.parameters()) - vision, vision


def arithmetic_table(gpus: int = 8, gpu_gib: float = 80.0) -> list[dict]:
    text, vision = parameter_counts()
    h, layers, inter, vocab = 3584, 28, 18944, 152064
    kv = 4 * 128
    tokens = 16384  # --max-tokens-per-micro-batch, both stages
    shard = text / gpus
    checkpoints = layers * tokens * h * 2  # each layer's bf16 input, kept by activation checkpointing
    one_layer = tokens * (4 * h + 2 * kv + 3 * inter) * 2 * 2  # a layer's activations while it is recomputed
    full_logits = tokens * vocab * 4 * 3  # fp32 logits, log-softmax and their gradient
    chunked = 1024 * vocab * 4 * 3
    vllm = 0.6 * gpu_gib * GIB
    root = (2 * vocab * h + h) * 2  # embeddings, lm_head and final norm, gathered in bf16
    rows = []
    for stage in ("sft", "grpo"):
        parts = {"weights fp32 (shard)": 4 * shard, "gradients fp32 (shard)": 4 * shard, "AdamW (shard)": 8 * shard}
        if stage == "sft":  # image SFT runs the frozen tower; text-only GRPO never does, and keeps it on the host
            parts["vision tower bf16 (frozen, replicated)"] = 2 * vision
        else:
            parts["reference fp32 (shard; shares the vision tower)"] = 4 * shard
        resident = sum(parts.values())
        for name, value in parts.items():
            rows.append({"stage": stage, "part": name, "GiB": value / GIB})
        rows.append({"stage": stage, "part": "activations, checkpointed (16k tokens)", "GiB": (checkpoints + one_layer) / GIB})
        rows.append({"stage": stage, "part": "logits: full fp32 (before)", "GiB": full_logits / GIB})
        rows.append({"stage": stage, "part": "logits: 1,024-token chunks (now)", "GiB": chunked / GIB})
        if stage == "grpo":
            rows.append({"stage": stage, "part": "vLLM (0.6 x 80 GiB: bf16 weights + KV cache), asleep in training",
                         "GiB": vllm / GIB})
            rows.append({"stage": stage, "part": "  of which weights bf16", "GiB": 2 * (text + vision) / GIB})
            held_before = 2 * vision + root  # the tower on the GPU, the reference's root left gathered
            rows.append({"stage": stage, "part": "before: vision tower bf16 + the reference's root left gathered after "
                                                 "its forward", "GiB": held_before / GIB})
            rows.append({"stage": stage, "part": "peak in rollout, before: resident + those + vLLM",
                         "GiB": (resident + held_before + vllm) / GIB})
            rows.append({"stage": stage, "part": "peak in rollout, now (tower on the host, reference resharded)",
                         "GiB": (resident + vllm) / GIB})
            rows.append({"stage": stage, "part": f"margin on {gpu_gib:.0f} GiB with vLLM awake: before / now",
                         "GiB": f"{(gpu_gib * GIB - resident - held_before - vllm) / GIB:.1f} / "
                                f"{(gpu_gib * GIB - resident - vllm) / GIB:.1f}"})
        rows.append({"stage": stage, "part": "peak in training: resident + activations + chunked logits",
                     "GiB": (resident + checkpoints + one_layer + chunked) / GIB})
        rows.append({"stage": stage, "part": "peak in training, before (full logits, no checkpointing: ~7 MiB/token)",
                     "GiB": (resident + tokens * 7 * 2 ** 20 + full_logits) / GIB})
    return rows


def main():
    work = tempfile.mkdtemp(prefix="memory-")
    print_table(f"bench/memory.py: peak RSS of one step, vocabulary {VOCAB:,}, {TOKENS:,} tokens in one micro-batch "
                f"({SEQUENCES} sequences), hidden 128, 2 layers", measured_table(work))
    text, vision = parameter_counts()
    print_table(f"bench/memory.py: per-GPU memory, Qwen2.5-VL-7B ({text / 1e9:.2f} B language, {vision / 1e9:.2f} B "
                f"vision), 8 x 80 GiB, defaults of sft.py / grpo.py", arithmetic_table())


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--measure":
        print(measure(*sys.argv[2:]))
    else:
        main()
