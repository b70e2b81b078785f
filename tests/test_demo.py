"""The demo's pieces on a short setting (the full demo is `make demo`), and its task generator."""
import json
import re

import demo
from data import grade
from data.prompts import assistant_target
from data.synthetic import sums


def test_the_programmatic_chain_of_thought_is_correct():
    for record in sums(200, seed=1) + sums(50, seed=2, terms=4):
        numbers = [int(n) for n in re.findall(r"\d+", record.messages[0]["content"].rsplit("question:", 1)[1])]
        total = numbers[0]
        for line, n in zip(record.target_think.splitlines(), numbers[1:]):
            assert line == f"{total} + {n} = {total + n}"
            total += n
        assert record.answer == str(total) == record.target_answer
        assert grade(assistant_target(record.target_think, record.target_answer), record.answer) == 1.0
    assert len({r.messages[0]["content"] for r in sums(100, seed=3)}) > 50


def test_the_demo_runs_every_stage_on_a_short_setting(tmp_path):
    demo.main(["--quick", "--output-dir", str(tmp_path)])
    with open(tmp_path / "results.json") as fh:
        results = json.load(fh)
    assert [s["stage"] for s in results["stages"]] == ["random init", "after SFT", "after GRPO"]
    for row in results["stages"]:
        assert set(row) == {"stage", "heldout_accuracy", "longer_accuracy", "forced_exit_rate", "mean_output_tokens"}
        assert 0.0 <= row["heldout_accuracy"] <= 1.0
    assert results["stages"][0]["forced_exit_rate"] == 1.0  # a random model never stops thinking by itself
    assert results["distillation"]["samples"] == 4 * 4
    table = (tmp_path / "results.md").read_text()
    assert "| after GRPO |" in table and "distillation acceptance rate" in table
    for path in ("sft/model/model.safetensors", "grpo/model/model.safetensors", "grpo/metrics.jsonl",
                 "eval/grpo/heldout.jsonl", "eval/grpo/longer.summary.json", "distilled.jsonl.summary.json"):
        assert (tmp_path / path).exists(), path
