"""The recipe as scripts (runs/*.sh): valid bash, and every command they print under DRY_RUN=1 parses with the
argparse of the stage it runs, so that a renamed flag breaks a test and not a 56-hour run; a stage whose output
is complete is skipped, and an interrupted one resumes."""
import importlib
import os
import shlex
import subprocess

import pytest

from data.benchmarks import BENCHMARKS
from data.loaders import FILE_SUFFIXES, SOURCES
from tests.conftest import ROOT

SCRIPTS = ["runs/xreasoner.sh", "runs/xreasoner_med.sh", "runs/eval_paper.sh"]


def dry_run(script: str, **env) -> list[list[str]]:
    result = subprocess.run(["bash", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, DRY_RUN="1", **env))
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def stage_commands(lines: list[str]) -> list[tuple[str, list[str]]]:
    """(stage script, its arguments) of every printed command."""
    commands = []
    for line in lines:
        if line.startswith("+ "):
            words = shlex.split(line[2:])
            at = next(i for i, word in enumerate(words) if word.endswith(".py") and not word.endswith("python"))
            commands.append((words[at], words[at + 1:]))
    return commands


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_recipe_script_is_bash_whose_commands_parse_with_each_stages_own_arguments(script, tmp_path):
    assert subprocess.run(["bash", "-n", script], cwd=ROOT).returncode == 0
    env = {"OUT": str(tmp_path / "out")}
    if script == "runs/eval_paper.sh":
        env.update(MEDICAL="1", NEJM=str(tmp_path / "nejm.jsonl"))
    commands = stage_commands(dry_run(script, **env))
    assert commands and not os.path.exists(tmp_path / "out")  # a dry run writes nothing
    for name, args in commands:
        stage = importlib.import_module(name.removesuffix(".py"))
        parsed = stage.parse_args(args)  # argparse exits on a flag the stage does not have
        if name == "evaluate.py":
            assert all(spec.partition("=")[0] in BENCHMARKS for spec in parsed.benchmarks.split(","))
        else:
            assert parsed.data in SOURCES or parsed.data.endswith(FILE_SUFFIXES), parsed.data
    expected = {"runs/xreasoner.sh": ["sft.py", "grpo.py", "evaluate.py", "evaluate.py"],
                "runs/xreasoner_med.sh": ["distill.py", "sft.py", "grpo.py", "evaluate.py", "evaluate.py"],
                "runs/eval_paper.sh": ["evaluate.py", "evaluate.py"]}[script]
    assert [name for name, _ in commands] == expected


def test_a_finished_stage_is_skipped_and_an_interrupted_one_resumes(tmp_path):
    out = tmp_path / "xr"
    (out / "sft" / "model").mkdir(parents=True)
    (out / "sft" / "model" / "config.json").write_text("{}")
    lines = dry_run("runs/xreasoner.sh", OUT=str(out))
    assert f"= {out}/sft/model is there: sft is done" in lines
    (grpo, args), *_ = stage_commands(lines)
    assert grpo == "grpo.py" and "--resume" in args and args[args.index("--model") + 1] == f"{out}/sft/model"
