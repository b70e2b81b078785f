#!/usr/bin/env bash
# X-Reasoner-Med (paper §3.2): from X-Reasoner, SFT on MedQA long CoTs distilled from QwQ-32B by rejection sampling,
# then GRPO on the same MedQA questions; then the paper's medical benchmarks (runs/eval_paper.sh, MEDICAL=1).
#
#   GPUS=8 XR_MODEL=runs/xr/grpo/model OUT=runs/xr-med runs/xreasoner_med.sh     # DRY_RUN=1: print only
#
# A stage whose output is complete is skipped; an interrupted one resumes (distill.py skips the questions done).
set -euo pipefail
cd "$(dirname "$0")/.."
source runs/common.sh

XR_MODEL=${XR_MODEL:-runs/xr/grpo/model}  # X-Reasoner, from runs/xreasoner.sh
TEACHER=${TEACHER:-Qwen/QwQ-32B}
TEACHER_TP=${TEACHER_TP:-$GPUS}  # the teacher's tensor parallelism: 32B in bf16 wants 2 x 80 GB or more
MEDQA=${MEDQA:-medqa}  # GBaker/MedQA-USMLE-4-options (train split), or a local copy
OUT=${OUT:-runs/xr-med}

# Distillation: 4 samples per question at QwQ's settings; keep one correct trace that closed its thinking
if [ -f "$OUT/medqa_qwq.jsonl.summary.json" ]; then
  echo "= $OUT/medqa_qwq.jsonl.summary.json is there: distillation is done"
else
  run "$PYTHON" distill.py --teacher "$TEACHER" --data "$MEDQA" --output "$OUT/medqa_qwq.jsonl" --samples 4 --keep 1 \
    --tensor-parallel-size "$TEACHER_TP"
fi

# SFT on the kept traces, then GRPO on the MedQA questions (the recipe's flags, as for X-Reasoner)
train sft sft.py --model "$XR_MODEL" --data "$OUT/medqa_qwq.jsonl"
train grpo grpo.py --model "$OUT/sft/model" --data "$MEDQA"

MODEL="$OUT/grpo/model" OUT="$OUT/eval" MEDICAL=1 runs/eval_paper.sh
