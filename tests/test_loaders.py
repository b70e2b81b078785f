"""Loaders on small files written in each real schema, and clear errors on bad input."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import DataError, load_records
from data.prompts import CHOICE_TEMPLATE, MATH_TEMPLATE, TRAIN_TEMPLATE
from data.records import Record


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


OT_ROW = {"system": "Your role as an assistant ...", "conversations": [
    {"from": "user", "value": "What is 2+3?"},
    {"from": "assistant", "value": "<|begin_of_thought|>\n\n2 plus 3 is 5.\n\n<|end_of_thought|>\n\n"
                                   "<|begin_of_solution|>\n\nThe answer is \\boxed{5}.\n\n<|end_of_solution|>"}]}


@pytest.mark.parametrize("writer", [write_json, write_jsonl, write_parquet])
def test_openthoughts_default_config(tmp_path, writer):
    path = writer(tmp_path / ("ot." + {write_json: "json", write_jsonl: "jsonl", write_parquet: "parquet"}[writer]),
                  [OT_ROW, OT_ROW])
    records = load_records(path)
    assert len(records) == 2
    r = records[0]
    assert r.target_think == "2 plus 3 is 5." and r.target_answer == "The answer is \\boxed{5}."
    assert r.messages == [{"role": "user", "content": TRAIN_TEMPLATE.format(question="What is 2+3?")}]


def test_openthoughts_metadata_config(tmp_path):
    row = {"problem": "Compute 1+1.", "deepseek_reasoning": "One and one.", "deepseek_solution": "**2**",
           "ground_truth_solution": "2", "domain": "math"}
    (r,) = load_records(write_jsonl(tmp_path / "m.jsonl", [row]))
    assert (r.target_think, r.target_answer, r.answer, r.meta["domain"]) == ("One and one.", "**2**", "2", "math")


def test_orz_math_pairs(tmp_path):
    rows = [[{"from": "human", "value": "Find x if 2x=4."},
             {"from": "assistant", "ground_truth": {"value": "2"}}]]
    (r,) = load_records(write_json(tmp_path / "orz_math_57k_collected.json", rows))
    assert r.answer == "2" and r.kind == "math" and "Find x if 2x=4." in r.messages[0]["content"]


def test_orz_eval_format_with_and_without_choices(tmp_path):
    rows = [{"prompt": [{"from": "user", "value": "What is 3*3?"}], "final_answer": "9"},
            {"prompt": [{"from": "user", "value": "Pick one."}], "final_answer": "B",
             "choices": {"A": "x", "B": "y", "C": "z", "D": "w"}}]
    math, choice = load_records(write_json(tmp_path / "math500.json", rows), style="eval")
    assert math.kind == "math" and math.messages[0]["content"] == MATH_TEMPLATE.format(question="What is 3*3?")
    assert choice.kind == "choice" and choice.options["B"] == "y"
    assert choice.messages[0]["content"].startswith(CHOICE_TEMPLATE.format(question="Pick one."))
    assert choice.messages[0]["content"].endswith("Options:\n\nA: x\nB: y\nC: z\nD: w")


def test_medqa(tmp_path):
    row = {"question": "A 23-year-old ...?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"},
           "answer": "c", "answer_idx": "C", "meta_info": "step1"}
    (r,) = load_records(write_jsonl(tmp_path / "medqa.jsonl", [row]))
    assert (r.kind, r.answer, r.options) == ("choice", "C", row["options"])


def test_mmlu_pro_and_health_subset(tmp_path):
    rows = [{"question_id": 1, "question": "Q1", "options": ["a", "b", "c"], "answer": "B", "answer_index": 1,
             "category": "health", "src": "x"},
            {"question_id": 2, "question": "Q2", "options": ["a", "b"], "answer": "A", "answer_index": 0,
             "category": "law", "src": "x"}]
    path = write_parquet(tmp_path / "mmlu.parquet", rows)
    assert [r.id for r in load_records(path)] == ["1", "2"]
    (health,) = load_records(path, data_format="mmlu_pro_health")
    assert (health.id, health.answer, health.options) == ("1", "B", {"A": "a", "B": "b", "C": "c"})


def test_gsm8k_and_math500(tmp_path):
    (g,) = load_records(write_jsonl(tmp_path / "g.jsonl", [{"question": "Q?", "answer": "So 1,200.\n#### 1,200"}]))
    assert g.answer == "1200"
    (m,) = load_records(write_jsonl(tmp_path / "m5.jsonl", [
        {"problem": "P", "solution": "S", "answer": "\\frac{1}{2}", "subject": "Algebra", "level": 2,
         "unique_id": "test/algebra/1.json"}]))
    assert (m.id, m.answer) == ("test/algebra/1.json", "\\frac{1}{2}")


def test_records_format_round_trip(tmp_path):
    from data import write_records
    rec = Record(id="q1", messages=[{"role": "user", "content": "hi"}], answer="3", target_think="t",
                 target_answer="3", meta={"teacher": "T"})
    path = str(tmp_path / "r.jsonl")
    write_records(path, [rec])
    assert load_records(path) == [rec]


def test_data_format_flag_overrides_detection(tmp_path):
    # Rows with gsm8k-like fields read as MATH-500 when told so.
    path = write_jsonl(tmp_path / "x.jsonl", [{"problem": "P", "answer": "7", "unique_id": "u"}])
    assert load_records(path, data_format="math500")[0].answer == "7"
    with pytest.raises(DataError, match="unknown data format 'nope'"):
        load_records(path, data_format="nope")


def test_hub_ids_go_through_datasets_load_dataset_and_an_unreachable_hub_is_one_line(monkeypatch):
    import datasets
    calls = []

    def load_dataset(hub_id, config, split):
        calls.append((hub_id, config, split))
        if hub_id == "org/unreachable":
            raise ConnectionError("Couldn't reach 'org/unreachable' on the Hub (LocalEntryNotFoundError)")
        return [{"question": "Q", "answer": "#### 4"}]
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_records("gsm8k")[0].answer == "4"
    load_records("medqa", split="test", data_format="gsm8k")
    assert calls == [("openai/gsm8k", "main", "test"), ("GBaker/MedQA-USMLE-4-options", None, "test")]
    with pytest.raises(DataError, match=r"^cannot load org/unreachable from the hub \(ConnectionError: Couldn't reach "
                                        r"'org/unreachable' on the Hub \(LocalEntryNotFoundError\)\); give --data a "
                                        r"local file in its fields instead \(JSON, JSONL or Parquet\)$"):
        load_records("org/unreachable", data_format="gsm8k")


@pytest.mark.parametrize("rows, message", [
    ([{"conversations": [{"from": "user", "value": "q"}]}], r"row 0: conversation needs a user and an assistant"),
    ([OT_ROW, {"conversations": []}], r"row 1: empty conversation"),
    ([{"question": "Q", "options": {"A": "a"}, "answer_idx": "A"}, {"question": "Q", "options": {"A": "a"}}],
     r"row 1: missing field 'answer_idx'"),
    ([{"question": "Q", "answer": 5}], r"row 0: field 'answer' must be a string"),
    ([[{"from": "human", "value": "q"}, {"from": "assistant", "ground_truth": {"value": 3}}]],
     r"row 0: ground_truth.value must be a string"),
    ([{"question": "Q", "options": {"A": "a", "B": "b"}, "answer_idx": "E"}], r"row 0: answer_idx 'E' is not one"),
])
def test_bad_rows_name_file_and_row(tmp_path, rows, message):
    path = write_json(tmp_path / "bad.json", rows)
    with pytest.raises(DataError, match=message) as info:
        load_records(path)
    assert str(info.value).startswith(path)


def test_not_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "Q", "answer": "#### 1"}\nthis is not json\n')
    with pytest.raises(DataError, match=r"broken.jsonl: line 2 is not valid JSON"):
        load_records(str(path))
    with pytest.raises(DataError, match=r"missing.json: no such file"):
        load_records(str(tmp_path / "missing.json"))


def test_unknown_fields_ask_for_data_format(tmp_path):
    with pytest.raises(DataError, match=r"row 0: cannot recognise the format.*--data-format"):
        load_records(write_jsonl(tmp_path / "u.jsonl", [{"foo": 1}]))


def test_records_name_images_relative_to_their_file_and_a_missing_one_names_the_record(tmp_path):
    from PIL import Image

    from data.benchmarks import load_benchmark
    (tmp_path / "img").mkdir()
    Image.new("RGB", (56, 28), "white").save(tmp_path / "img" / "a.png")
    image_row = Record(id="a", messages=[{"role": "user", "content": [{"type": "image", "image": "img/a.png"},
                                                                      {"type": "text", "text": "What is shown?"}]}],
                       answer="1", target_think="t", target_answer="1").to_json()
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(image_row) + "\n")
    for records in (load_records(str(path)), load_benchmark("records", str(path))):
        assert records[0].messages[0]["content"][0]["image"] == str(tmp_path / "img" / "a.png")
    missing = {**json.loads(json.dumps(image_row)), "id": "b"}
    missing["messages"][0]["content"][0]["image"] = "img/b.png"
    path.write_text(json.dumps(image_row) + "\n" + json.dumps(missing) + "\n")
    with pytest.raises(DataError, match=rf"^{path}: record b: image not found: {tmp_path / 'img' / 'b.png'}$"):
        load_records(str(path))
