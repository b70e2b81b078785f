# Shared by the runs/*.sh recipes (sourced, not run): how a stage is launched, skipped when its output is complete,
# and resumed when it was interrupted. DRY_RUN=1 prints every command without running it.
PYTHON=${PYTHON:-.venv/bin/python}
GPUS=${GPUS:-8}  # processes per node, one per GPU
# several nodes: LAUNCH="$PYTHON -m torch.distributed.run --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d
# --rdzv-endpoint \$HEAD_NODE:29500" on every node, and OUT on a file system they all see
LAUNCH=${LAUNCH:-"$PYTHON -m torch.distributed.run --standalone --nproc_per_node $GPUS"}

run() {  # print a command, and run it unless DRY_RUN=1
  echo "+ $*"
  [ "${DRY_RUN:-0}" = 1 ] || "$@"
}

train() {  # train NAME SCRIPT ARGS...: a training stage into $OUT/NAME, skipped once it has exported its model
  local name=$1 script=$2
  shift 2
  if [ -f "$OUT/$name/model/config.json" ]; then
    echo "= $OUT/$name/model is there: $name is done"
    return
  fi
  # --resume continues from the latest checkpoint of an interrupted run, and starts afresh where there is none
  # shellcheck disable=SC2086
  run $LAUNCH "$script" --output-dir "$OUT/$name" --resume "$@"
}

evaluate() {  # evaluate NAME ARGS...: evaluate.py into $OUT/NAME, skipped once it has written results.md
  local name=$1
  shift
  if [ -f "$OUT/$name/results.md" ]; then
    echo "= $OUT/$name/results.md is there: $name is done"
    return
  fi
  run "$PYTHON" evaluate.py --output-dir "$OUT/$name" "$@"  # a rerun skips the items already answered
}
