"""What a user meets before anything trains: the setup's checks in the order they come (Python, then the NVIDIA
driver), whether flash-attn is built, and --help that answers without importing vLLM."""
import os
import subprocess
import sys

import pytest

from scripts.flash_attn_plan import plan
from tests.conftest import ROOT


def _fake(path, script: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + script)
    path.chmod(0o755)


def _setup(tmp_path, flavour: str, **env):
    return subprocess.run(["bash", "scripts/setup_venv.sh", flavour, str(tmp_path / "venv")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, **env))


def test_the_setup_refuses_an_old_python_then_an_old_driver_before_installing_anything(tmp_path):
    _fake(tmp_path / "python3.10", 'if [ "$1" = --version ]; then echo "Python 3.10.12"; exit 0; fi\nexit 1\n')
    old_python = _setup(tmp_path, "cpu", PYTHON=str(tmp_path / "python3.10"))
    assert old_python.returncode == 1 and old_python.stderr.strip() == (
        f"error: {tmp_path / 'python3.10'} is Python 3.10.12; vllm 0.32 needs Python >= 3.11: install one and give "
        "it as PYTHON=python3.11")
    _fake(tmp_path / "nvidia-smi", 'echo "550.54.15"\n')  # what --query-gpu=driver_version prints
    old_driver = _setup(tmp_path, "gpu", PATH=f"{tmp_path}:{os.environ['PATH']}", PYTHON=sys.executable)
    assert old_driver.returncode == 1 and old_driver.stderr.strip() == (
        "error: NVIDIA driver 550.54.15 is older than 580.65, which PyPI's torch 2.13.0 (CUDA 13.0) needs: upgrade the "
        "driver, or install the CUDA 12.8 builds of torch and vLLM (docs/install.md)")
    assert not (tmp_path / "venv").exists()  # nothing was installed


@pytest.mark.parametrize("torch_cuda, nvcc, caps, build, reason", [
    ("13.0", "13.0", ["9.0"] * 8, True, "building for sm 90 with 4 parallel jobs (nvcc 13.0)"),
    ("13.0", "13.0", ["8.0", "9.0"], True, "building for sm 80, 90"),
    ("13.0", None, ["9.0"], False, "no nvcc: set CUDA_HOME to a CUDA 13 toolkit"),
    ("13.0", "12.8", ["9.0"], False, "nvcc is CUDA 12.8, torch is built for CUDA 13.0"),
    ("13.0", "13.0", ["7.5"], False, "no GPU of compute capability 8.0 or newer"),
    (None, "13.0", [], False, "torch has no CUDA"),
])
def test_flash_attn_is_built_only_where_it_can_be(torch_cuda, nvcc, caps, build, reason):
    built, said, settings = plan(torch_cuda, nvcc, caps, cpus=16, memory_gib=37)
    assert built is build and reason in said
    if build:
        assert settings["MAX_JOBS"] == "4" and settings["FLASH_ATTN_CUDA_ARCHS"] == ";".join(
            sorted({c.replace(".", "") for c in caps}, key=int))
    elif torch_cuda:
        assert "torch's varlen kernel" in said and not settings


def test_the_stages_import_without_vllm_so_that_help_is_quick():
    """vLLM's import takes seconds: the stage scripts import it where they use it, not to print --help."""
    code = "import sys, sft, grpo, evaluate, distill, forced_exit; print(sorted({'vllm', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
