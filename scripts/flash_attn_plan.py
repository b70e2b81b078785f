"""Whether scripts/setup_venv.sh builds flash-attn here, and with what: one line it prints, then its settings.

    .venv/bin/python scripts/flash_attn_plan.py   ->   "build" or "skip" on the first line, the reason on the
                                                       second, then NAME=VALUE settings for the build

flash-attn is an accelerator here, never a requirement: without it a packed row attends through torch's own
varlen kernel (packing.py), the same layout. It publishes no wheel for this torch, so pip compiles it, and
that works only with an nvcc of torch's CUDA major version (torch's build check refuses another), for the
GPUs present (FLASH_ATTN_CUDA_ARCHS, sm 8.0 and newer), with ninja on PATH and as many parallel jobs as the
memory holds (MAX_JOBS; a job takes up to ~8 GB), or it compiles for hours.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

FLASH_ATTN_ARCHS = ("80", "90", "100", "120")  # what flash-attn 2.8.3 compiles for
GIB_PER_JOB = 8


def plan(torch_cuda: str | None, nvcc_release: str | None, compute_caps: list[str], cpus: int,
         memory_gib: float) -> tuple[bool, str, dict[str, str]]:
    """(build or not, the reason in one line, the build's environment). nvcc_release: "13.0" from `nvcc
    --version`, or None without nvcc; compute_caps: the GPUs' "9.0"-style capabilities."""
    fallback = "training attends through torch's varlen kernel instead (packed rows all the same)"
    if torch_cuda is None:
        return False, "flash-attn: not built (torch has no CUDA)", {}
    if nvcc_release is None:
        return False, (f"flash-attn: not built (no nvcc: set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]} toolkit "
                       f"to build it); {fallback}"), {}
    if nvcc_release.split(".")[0] != torch_cuda.split(".")[0]:
        return False, (f"flash-attn: not built (nvcc is CUDA {nvcc_release}, torch is built for CUDA {torch_cuda}, "
                       f"and torch's build check needs the same major version); {fallback}"), {}
    archs = sorted({cap.replace(".", "") for cap in compute_caps} & set(FLASH_ATTN_ARCHS), key=int)
    if not archs:
        return False, f"flash-attn: not built (no GPU of compute capability 8.0 or newer); {fallback}", {}
    jobs = max(1, min(cpus, int(memory_gib // GIB_PER_JOB)))
    return True, (f"flash-attn: building for sm {', '.join(archs)} with {jobs} parallel jobs (nvcc {nvcc_release}); "
                  "if the build fails, " + fallback), {
        "MAX_JOBS": str(jobs), "FLASH_ATTN_CUDA_ARCHS": ";".join(archs), "FLASH_ATTENTION_FORCE_BUILD": "TRUE"}


def nvcc_release() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None
    found = re.search(r"release (\d+\.\d+)", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
    return found.group(1) if found else None


def compute_caps() -> list[str]:
    result = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                            text=True)
    return [line.strip() for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []


def memory_gib() -> float:
    with open("/proc/meminfo") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable")) / 2 ** 20


if __name__ == "__main__":
    import torch
    build, reason, settings = plan(torch.version.cuda, nvcc_release(), compute_caps(), os.cpu_count() or 1,
                                   memory_gib())
    print("build" if build else "skip")
    print(reason)
    for name, value in settings.items():
        print(f"{name}={value}")
