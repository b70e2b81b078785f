"""The demo's pieces on a short setting (the full demo is `make demo`), and its task generator."""
import json
import re

import numpy as np
from PIL import Image

import demo
from data import grade, load_records, write_records
from data.prompts import assistant_target
from data.synthetic import CELL, sum_records


def _question(record) -> str:
    content = record.messages[0]["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


def test_every_form_asks_the_same_kind_of_sum_and_the_chain_of_thought_is_correct(tmp_path):
    for form in ("text", "word", "image"):
        for record in sum_records(100, 1, form, str(tmp_path), form):
            numbers = record.meta["numbers"]
            lines = record.target_think.splitlines()
            assert lines[0] == " + ".join(map(str, numbers))
            total = numbers[0]
            for line, n in zip(lines[1:], numbers[1:]):
                assert line == f"{total} + {n} = {total + n}"
                total += n
            assert record.answer == str(sum(numbers)) == record.target_answer
            assert grade(assistant_target(record.target_think, record.target_answer), record.answer) == 1.0
            if form != "image":  # the text holds the numbers, in order
                assert [int(n) for n in re.findall(r"\d", _question(record))] == numbers
            else:  # the image holds them; the text only the instruction
                assert not re.search(r"\d", _question(record))
    reading = sum_records(5, 1, "reading", str(tmp_path), "r")
    assert all(r.target_think is None and r.answer == " + ".join(map(str, r.meta["numbers"])) for r in reading)


def test_the_image_draws_one_character_per_merged_patch(tmp_path):
    (record,) = sum_records(1, 2, "image", str(tmp_path), "i")
    write_records(str(tmp_path / "d.jsonl"), [record])
    (loaded,) = load_records(str(tmp_path / "d.jsonl"))
    image = np.asarray(Image.open(loaded.messages[0]["content"][0]["image"]).convert("L"))
    assert image.shape == (CELL, 5 * CELL)  # "a+b+c": 5 cells, so 5 image tokens in Qwen2.5-VL
    cells = [image[:, i * CELL:(i + 1) * CELL] for i in range(5)]
    assert all((cell < 128).any() for cell in cells)  # ink in every cell
    assert np.array_equal(cells[1], cells[3])  # both "+" drawn alike
    assert (image[:, :2] > 200).all() and (image[:, -2:] > 200).all()  # glyphs inside their cells


def test_the_demo_runs_every_stage_on_a_short_setting(tmp_path):
    demo.main(["--quick", "--output-dir", str(tmp_path)])
    with open(tmp_path / "results.json") as fh:
        results = json.load(fh)
    assert [s["stage"] for s in results["stages"]] == ["0. instruct", "1. + CoT SFT (text)", "2. + GRPO (text)"]
    for row in results["stages"]:
        for form in ("text", "image", "word", "reading"):
            assert 0.0 <= row[form] <= 1.0
        assert row["seconds"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| image (X-modality) |" in table and "| 2. + GRPO (text) |" in table
    for path in ("instruct/model/model.safetensors", "sft/model/model.safetensors", "grpo/model/model.safetensors",
                 "grpo/metrics.jsonl", "eval/grpo/eval_image.jsonl", "eval/instruct/eval_reading.summary.json"):
        assert (tmp_path / path).exists(), path
    # the instruct stage trained on images; the later stages on text only
    assert any(isinstance(m["content"], list) for r in load_records(str(tmp_path / "data" / "instruct.jsonl"))
               for m in r.messages)
    for name in ("cot", "rl"):
        assert all(isinstance(m["content"], str) for r in load_records(str(tmp_path / "data" / f"{name}.jsonl"))
                   for m in r.messages)
