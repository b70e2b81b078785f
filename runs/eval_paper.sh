#!/usr/bin/env bash
# The paper's evaluation of one model (§4): greedy decoding on every benchmark (Fig. 1, Table 5), then 5 samples at
# temperature 0.3 where the paper reports avg@5 (Figs. 3-4), forced exit at 4,096 tokens throughout. Each output
# directory's results.md sets ours beside the paper's numbers.
#
#   MODEL=runs/xr/grpo/model OUT=runs/xr/eval runs/eval_paper.sh
#   MEDICAL=1 OMNIMEDVQA=/data/omni/QA_information/Open-access/x.json NEJM=/data/nejm.jsonl MODEL=... runs/eval_paper.sh
#
# MEDICAL=1 evaluates the medical benchmarks instead of the general ones; OmniMedVQA and the NEJM Image Challenge
# have no hub copy and run only when their files are given (schemas: data/benchmarks.py, docs/data.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source runs/common.sh

MODEL=${MODEL:-runs/xr/grpo/model}
OUT=${OUT:-runs/eval}
TP=${TP:-1}  # vLLM tensor parallelism (a 7B fits one GPU)
IMAGE_ROOT=${IMAGE_ROOT:-}  # where image paths are relative to, per benchmark: NAME=PATH,... (evaluate.py --help)

if [ "${MEDICAL:-0}" = 1 ]; then
  greedy=medqa,mmlu_pro_health,mmmu_health,mmmu_pro_health,medxpertqa_mm
  sampled=medqa,mmlu_pro_health,mmmu_pro_health
  for local in "omnimedvqa=${OMNIMEDVQA:-}" "nejm=${NEJM:-}"; do
    if [ -n "${local#*=}" ]; then
      greedy="$greedy,$local"
      sampled="$sampled,$local"
    else
      echo "= ${local%%=*}: no file given (${local%%=*} has no hub copy), left out"
    fi
  done
else
  greedy=gsm8k,mmlu_pro,mmmu,mmmu_pro,mathvista,mathvision,mmstar
  sampled=gsm8k,mmlu_pro,mmmu_pro,mathvision
fi
common=(--model "$MODEL" --tensor-parallel-size "$TP" ${IMAGE_ROOT:+--image-root "$IMAGE_ROOT"})

evaluate greedy "${common[@]}" --benchmarks "$greedy"
evaluate sampled "${common[@]}" --benchmarks "$sampled" --temperature 0.3 --samples 5
