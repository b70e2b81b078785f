"""`make gpu-check` itself, on CPU: the tiny config runs every stage of the check's own path, and without
GPUs the real check refuses in one line."""
import subprocess
import sys

from tests.conftest import ROOT


def _gpu_check(*args):
    return subprocess.run([sys.executable, "gpu_check.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def test_the_tiny_check_runs_every_stage_and_prints_its_table(tmp_path):
    result = _gpu_check("--config", "tiny", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout[result.stdout.index("gpu_check.py: tiny, 1 x CPU"):]
    rows = {line.split("  ")[0].strip(): line for line in table.splitlines()[3:] if line.strip()}
    assert {"sft (training)", "grpo 1 rollout", "grpo 1 training", "grpo 1 wake + sync", "grpo 2 wake + sync",
            "evaluate (text + image)"} <= set(rows)
    assert "sdpa/padded" in rows["sft (training)"] and "sdpa/padded" in rows["grpo 2 training"]
    assert "greedy match 1.00, log-prob gap 0.0000" in rows["grpo 2 wake + sync"]  # fp32 on CPU: exact
    assert "forced exit at 16: 8/8 closed" in rows["evaluate (text + image)"]
    assert result.stdout.strip().endswith("gpu-check: every stage ran and every check passed")
    # each stage read the model the one before exported; each model went once the next stage was done with it
    assert "wrote the random-init weights" in result.stdout and "and no checkpoint" in result.stdout
    assert not any((tmp_path / stage / "model").exists() for stage in ("model", "sft", "grpo"))
    assert not any((tmp_path / stage / "checkpoints").exists() for stage in ("sft", "grpo"))
    assert (tmp_path / "grpo" / "rollouts" / "step_00000002.jsonl").exists()


def test_without_gpus_the_check_says_so_and_fails(tmp_path):
    result = _gpu_check("--output-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("gpu-check: no GPU visible (NVML finds none)")
    assert "Traceback" not in result.stderr
