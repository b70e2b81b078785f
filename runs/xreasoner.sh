#!/usr/bin/env bash
# X-Reasoner (paper §2): from Qwen2.5-VL-7B-Instruct, long-CoT SFT on OpenThoughts-114k, then GRPO on Orz-math-57k,
# both on text only; then the paper's general benchmarks (runs/eval_paper.sh).
#
#   GPUS=8 OUT=runs/xr runs/xreasoner.sh        # DRY_RUN=1 prints the commands instead of running them
#
# Every stage runs with the paper's flags (the scripts' defaults; --help says which are our choices). A stage whose
# model is exported is skipped; an interrupted one resumes from its latest checkpoint. The paper: SFT on 8 (or 32)
# A100-40GB for about 8 hours, GRPO on 32 A100-40GB for about 56 hours.
set -euo pipefail
cd "$(dirname "$0")/.."
source runs/common.sh

BASE=${BASE:-Qwen/Qwen2.5-VL-7B-Instruct}  # a hub id or a local copy
SFT_DATA=${SFT_DATA:-openthoughts}  # open-thoughts/OpenThoughts-114k, or a local file in its fields
RL_DATA=${RL_DATA:-orz_math_57k_collected.json}  # the Open-Reasoner-Zero repository's file
RL_EVAL=${RL_EVAL:-}  # optional held-out prompts scored every 50 GRPO steps (e.g. ORZ's math500.json)
OUT=${OUT:-runs/xr}

# Stage 1: long-CoT SFT, 4 epochs, lr 1e-5 x0.8 per epoch, 128 sequences per step of up to 4,096 tokens
train sft sft.py --model "$BASE" --data "$SFT_DATA"

# Stage 2: GRPO, 8 responses per prompt, 128 prompts per batch, lr 3e-6, KL 0.01, clip 0.2/0.28, 3 epochs
train grpo grpo.py --model "$OUT/sft/model" --data "$RL_DATA" ${RL_EVAL:+--eval-data "$RL_EVAL"}

# Evaluation: greedy (the headline numbers), then 5 samples at temperature 0.3 (mean, majority, pass@5)
MODEL="$OUT/grpo/model" OUT="$OUT/eval" runs/eval_paper.sh
