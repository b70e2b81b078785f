"""evaluate.py: metrics against hand-computed values, and end-to-end runs on local files."""
import json
import os

import pytest

import evaluate
from data.records import DataError


def test_pass_at_k_hand_computed():
    assert evaluate.pass_at_k(5, 0, 5) == 0.0
    assert evaluate.pass_at_k(5, 1, 5) == 1.0
    assert evaluate.pass_at_k(5, 1, 1) == pytest.approx(0.2)
    assert evaluate.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)


def test_majority_vote_hand_computed():
    assert evaluate.majority_vote(["3", "4", "3", None, "5"], [1, 0, 1, 0, 0]) == 1
    assert evaluate.majority_vote(["4", "3", "4", "3", "4"], [0, 1, 0, 1, 0]) == 0
    assert evaluate.majority_vote(["4", "3", "3", "4"], [0, 1, 1, 0]) == 0  # tie: the answer seen first
    assert evaluate.majority_vote([None, None], [0, 0]) == 0
    # choice answers in different forms vote together
    opts = {"A": "Yes", "B": "No"}
    assert evaluate.majority_vote(["A", "B: No", "(B)", "No", "A"], [0, 1, 1, 1, 0], opts) == 1


def test_wilson_intervals_match_hand_computed_values():
    assert evaluate.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert evaluate.wilson(200, 400) == pytest.approx((0.4512, 0.5488), abs=1e-4)
    assert evaluate.wilson(400, 400) == pytest.approx((0.9905, 1.0), abs=1e-4)


def test_intervals_are_wilsons_for_right_or_wrong_items_and_normal_for_fractions():
    assert evaluate.interval([1.0, 0.0, 0.0, 0.0]) == pytest.approx(evaluate.wilson(1, 4))
    # per-item means 0.2, 0.4, 0.6: mean 0.4, sample sd 0.2, half width 1.96 * 0.2 / sqrt(3) = 0.2263
    assert evaluate.interval([0.2, 0.4, 0.6]) == pytest.approx((0.1737, 0.6263), abs=1e-4)
    # 0.9, 1.0, 0.8: mean 0.9, sd 0.1, half width 0.1132, clipped at 1
    assert evaluate.interval([0.9, 1.0, 0.8]) == pytest.approx((0.7868, 1.0), abs=1e-4)


def test_summary_of_fixed_graded_samples():
    items = [  # 3 items x 5 samples
        {"correct": [1, 1, 0, 0, 0], "extracted": ["2", "2", "3", "3", "3"], "forced_exit": [0, 0, 0, 0, 1],
         "output_tokens": [10] * 5},
        {"correct": [0, 0, 0, 0, 0], "extracted": ["1"] * 5, "forced_exit": [0] * 5, "output_tokens": [20] * 5},
        {"correct": [1, 1, 1, 0, 1], "extracted": ["5", "5", "5", "6", "5"], "forced_exit": [1, 1, 0, 0, 0],
         "output_tokens": [30] * 5},
    ]
    s = evaluate.summarize("x", items, samples=5)
    assert s["n"] == 3
    assert s["mean_acc"] == pytest.approx(6 / 15)
    assert s["majority_acc"] == pytest.approx(1 / 3)  # only item 3's majority is right
    assert s["pass_at_k"] == s["pass_at_5"] == pytest.approx(2 / 3)
    assert s["forced_exit_rate"] == pytest.approx(3 / 15)
    assert s["mean_output_tokens"] == pytest.approx(20)
    assert s["majority_acc_interval"] == pytest.approx(list(evaluate.wilson(1, 3)))
    assert s["mean_acc_interval"] == pytest.approx(list(evaluate.interval([0.4, 0.0, 0.8])))


def _gsm8k_file(tmp_path, n=6):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"so\n#### {i + 1}"}) + "\n"
                            for i in range(n)))
    return str(path)


def _read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_text_benchmark_end_to_end_through_vllm(qwen2_multi, tmp_path, capsys):
    data, out = _gsm8k_file(tmp_path), str(tmp_path / "eval")
    argv = ["--model", qwen2_multi, "--benchmarks", f"gsm8k={data}", "--output-dir", out, "--limit", "4",
            "--max-tokens", "24", "--answer-tokens", "8", "--max-model-len", "1024"]
    (summary,) = evaluate.main(argv)
    items = _read_jsonl(f"{out}/gsm8k.jsonl")
    assert [i["id"] for i in items] == ["0", "1", "2", "3"]
    for item in items:
        assert set(item) >= {"id", "prompt", "responses", "extracted", "correct", "forced_exit", "output_tokens",
                             "finish_reason"}
        # A random model never closes its thinking: the exit is forced at 24 - 8 = 16 tokens.
        assert item["forced_exit"] == [True] and item["output_tokens"][0] <= 24
        assert "</think>" in item["responses"][0]
    with open(f"{out}/gsm8k.summary.json") as fh:
        on_disk = json.load(fh)
    assert on_disk == {k: v for k, v in summary.items() if k != "think_budget"}
    assert on_disk["n"] == 4 and on_disk["forced_exit_rate"] == 1.0 and "accuracy" in on_disk
    assert "forced_exit_rate" in capsys.readouterr().out  # the table
    # results.md: our accuracy with its interval and n, beside the paper's numbers for GSM8K and our difference
    lines = open(f"{out}/results.md").read().splitlines()
    low, high = (100 * x for x in on_disk["accuracy_interval"])
    ours = 100 * on_disk["accuracy"]
    assert lines[0] == f"# {qwen2_multi}"
    assert "| benchmark | metric | n | ours | Qwen2.5-VL-7B-Instruct | X-Reasoner | X-Reasoner-Med |" in lines
    assert f"| gsm8k | accuracy | 4 | {ours:.1f} [{low:.1f}, {high:.1f}] | 84.9 ({ours - 84.9:+.1f}) | " \
        f"88.2 ({ours - 88.2:+.1f}) | – |" in lines
    # A rerun skips finished items and only adds the new ones; one with another model into the same directory
    # would mix two models' answers, and is refused before it loads anything.
    evaluate.main(argv[:-6] + ["--limit", "6", "--max-tokens", "24", "--answer-tokens", "8", "--max-model-len", "1024"])
    assert [i["id"] for i in _read_jsonl(f"{out}/gsm8k.jsonl")] == ["0", "1", "2", "3", "4", "5"]
    with pytest.raises(SystemExit, match=rf"^error: {out}/run.json: this run was started with --max-tokens 24; it "
                                         r"cannot continue with 32 \(start a new run in another --output-dir\)$"):
        evaluate.main(argv[:-6] + ["--max-tokens", "32", "--answer-tokens", "8"])
    with open(f"{out}/run.json") as fh:
        recorded = json.load(fh)
    assert recorded["stage"] == "evaluate" and recorded["changed"] == {"limit": [4, 6]}


def test_budgets_write_a_table_and_a_plot(qwen2_single, tmp_path):
    data, out = _gsm8k_file(tmp_path, 2), str(tmp_path / "scaling")
    evaluate.main(["--model", qwen2_single, "--benchmarks", f"gsm8k={data}", "--output-dir", out,
                   "--budgets", "4,8", "--answer-tokens", "4", "--max-model-len", "1024"])
    with open(f"{out}/budget_scaling.json") as fh:
        curve = json.load(fh)
    assert [b for b, _ in curve["gsm8k"]] == [4, 8]
    assert os.path.getsize(f"{out}/budget_scaling.png") > 1000
    for b in (4, 8):
        assert all(len(i["responses"]) == 1 and i["output_tokens"][0] <= b + 4
                   for i in _read_jsonl(f"{out}/budget_{b}/gsm8k.jsonl"))


def _nejm_file(tmp_path, n=3, missing=False):
    from PIL import Image
    os.makedirs(tmp_path / "img", exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (64 + 8 * i, 64), (40 * i, 90, 160)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"id": f"nejm-{i}", "question": "What is shown?", "options": {"A": "rash", "B": "fracture"},
                     "answer": "AB"[i % 2], "image": f"img/{i if not (missing and i == 1) else 'gone'}.png"})
    path = tmp_path / "nejm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_image_benchmark_through_transformers_with_the_tiny_vlm(qwen2_5_vl, tmp_path):
    out = str(tmp_path / "eval")
    (summary,) = evaluate.main(["--model", qwen2_5_vl, "--backend", "hf", "--benchmarks", f"nejm={_nejm_file(tmp_path)}",
                                "--output-dir", out, "--max-tokens", "12", "--answer-tokens", "4",
                                "--temperature", "0.7", "--samples", "2", "--text-only-probe", "2",
                                "--max-pixels", str(112 * 112), "--min-pixels", str(56 * 56)])
    items = _read_jsonl(f"{out}/nejm.jsonl")
    assert len(items) == 3 and all(len(i["responses"]) == 2 and "<image>" in i["prompt"] for i in items)
    assert all(len(i["text_only_correct"]) == 2 and isinstance(i["text_solvable"], bool) for i in items)
    assert {"mean_acc", "majority_acc", "pass_at_k", "n_text_solvable", "accuracy_without_text_solvable"} <= set(summary)


def test_missing_image_names_the_item(qwen2_5_vl, tmp_path):
    with pytest.raises(DataError, match=r"nejm.jsonl: row 1: image not found: .*gone.png"):
        evaluate.main(["--model", qwen2_5_vl, "--backend", "hf", "--output-dir", str(tmp_path / "o"),
                       "--benchmarks", f"nejm={_nejm_file(tmp_path, missing=True)}"])


def test_unknown_benchmark_lists_the_known_ones(tmp_path):
    with pytest.raises(SystemExit, match="unknown benchmark 'mmlu'; known: gsm8k, mmlu_pro"):
        evaluate.main(["--model", "unused", "--benchmarks", "mmlu"])
