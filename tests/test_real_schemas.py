"""Benchmarks and grading on rows in the real data sets' schemas, with the structures that broke them:
letters as option texts, nested option lists, image options, answer-format hints, list golds, options
already in the question, five-option MedQA, image roots, damaged golds. Rows are written here."""
import json

import pytest
from PIL import Image

import evaluate
from data.benchmarks import load_benchmark
from data.grading import MAX_ANSWER_CHARS, damaged_gold, grade, grade_many
from data.loaders import load_records

A = "<answer>{}</answer>".format
MEDXPERT_OPTIONS = {"A": "A", "B": "C", "C": "D", "D": "E", "E": "B"}  # option texts that are letters
MMMU_PRO_OPTIONS = dict(zip("ABCDE", ["B", "D", "E", "A", "C"]))


@pytest.mark.parametrize("options", [MEDXPERT_OPTIONS, MMMU_PRO_OPTIONS])
@pytest.mark.parametrize("prediction", ["B", "(B)", "B.", "B: C", "\\boxed{B}", "Option B"])
def test_a_label_wins_over_an_option_text_that_is_a_letter(options, prediction):
    assert grade(A(prediction), "B", options) == 1.0


@pytest.mark.parametrize("options", [MEDXPERT_OPTIONS, MMMU_PRO_OPTIONS])
def test_a_wrong_label_is_wrong_even_when_it_is_the_gold_options_text(options):
    text_of_gold = options["B"]  # "C" or "D": a label of another option, not the gold's text
    assert grade(A(text_of_gold), "B", options) == 0.0
    assert grade_many([A(letter) for letter in "ABCDE"], ["B"] * 5, [options] * 5) == [0, 1, 0, 0, 0]


def test_an_option_text_is_still_matched_when_the_prediction_is_not_a_label():
    options = {"A": "A cat", "B": "dog", "C": "A dog."}
    assert grade(A("A cat"), "A", options) == 1.0  # begins like label A, but is option A's text
    assert grade(A("A dog"), "C", options) == 1.0  # an option text ending in "." (20 of 198 GPQA items)
    assert grade(A("a dog."), "C", options) == 1.0
    assert grade(A("dog"), "B", options) == 1.0


def test_a_labelled_answer_longer_than_the_answer_limit_is_read_by_its_label():
    options = {"A": "short", "B": "x" * (MAX_ANSWER_CHARS + 50)}
    assert grade(A("B: " + options["B"]), "B", options) == 1.0
    assert grade(A("x" * (MAX_ANSWER_CHARS + 5)), "3") == 0.0  # math answers keep the limit


@pytest.mark.parametrize("prediction, gold, expected", [
    ("x^2 + 2py = 0", "0", 0), ("a + b = 3", "3", 0), ("x = 3", "3", 1), ("y=3", "3", 1), ("\\alpha = 3", "3", 1),
    ("x_1 = 3", "3", 1), ("2", "2:1", 0), ("2:1", "2:1", 1), ("2 : 1", "2:1", 1), ("1:2", "2:1", 0),
    ("3:1", "2:1", 0), ("y = 2x + 1", "y=2x+1", 1),
])
def test_equations_and_ratios(prediction, gold, expected):
    assert grade(A(prediction), gold) == expected


def _image(path, colour):
    Image.new("RGB", (32, 32), colour).save(path)
    return path.name


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_mmmu_pro_nested_option_list_and_image_options(tmp_path):
    images = {n: _image(tmp_path / f"{n}.png", (40 * n, 0, 0)) for n in (1, 2, 3)}
    rows = [
        {"id": "validation_Accounting_29", "question": "Which is right?", "answer": "C",
         "options": "[['A', 'B', 'Not enough information']]", "image_1": images[1], "subject": "Accounting"},
        {"id": "test_Art_1", "question": "<image 1> Which painting matches it?", "answer": "C",
         "options": "['<image 3>', '<image 2>', 'neither']", "image_1": images[1], "image_2": images[2],
         "image_3": images[3], "subject": "Art"},
    ]
    nested, image_options = load_benchmark("mmmu_pro", _write(tmp_path / "pro.jsonl", rows))
    assert nested.options == {"A": "A", "B": "B", "C": "Not enough information"} and nested.answer == "C"
    parts = image_options.messages[0]["content"]
    shown = [(p["text"].strip(), parts[i + 1]["image"].getpixel((0, 0))) for i, p in enumerate(parts[:-1])
             if p["type"] == "text" and parts[i + 1]["type"] == "image"]
    # in the order the question and options name them, each labelled as the text names it
    assert shown == [("<image 1>:", (40, 0, 0)), ("<image 3>:", (120, 0, 0)), ("<image 2>:", (80, 0, 0))]
    assert "A: <image 3>\nB: <image 2>\nC: neither" in parts[-1]["text"]


def test_mmmu_list_golds_become_alternatives(tmp_path):
    row = {"id": "validation_Math_3", "question": "<image 1> The ratio?", "answer": "['1.5', '3/2']", "options": "[]",
           "image_1": _image(tmp_path / "i.png", (1, 2, 3)), "question_type": "open"}
    (record,) = load_benchmark("mmmu", _write(tmp_path / "mmmu.jsonl", [row]))
    assert record.answer == ["1.5", "3/2"]
    assert grade_many([A("3/2"), A("1.5"), A("2")], [record.answer] * 3) == [1.0, 1.0, 0.0]


def test_mathvista_uses_the_query_hint_and_grades_at_its_precision(tmp_path):
    image = _image(tmp_path / "m.png", (9, 9, 9))
    hint = "Hint: Please answer the question requiring a floating-point number with one decimal place."
    rows = [{"pid": "7", "question": "How long is it?", "query": f"{hint}\nQuestion: How long is it?",
             "question_type": "free_form", "answer_type": "float", "precision": 1.0, "answer": "1.2",
             "choices": None, "decoded_image": image},
            {"pid": "8", "question": "Which?", "query": "Hint: answer with the option letter.\nQuestion: Which?\n"
             "Choices:\n(A) 3\n(B) 4", "question_type": "multi_choice", "answer_type": "integer", "precision": None,
             "answer": "4", "choices": ["3", "4"], "decoded_image": image}]
    free, choice = load_benchmark("mathvista", _write(tmp_path / "mv.jsonl", rows))
    assert hint in free.messages[0]["content"][-1]["text"] and free.meta == {"precision": 1}
    scores = grade_many([A("1.21"), A("1.2"), A("1.26"), A("1.21")], ["1.2"] * 4, precisions=[1, 1, 1, None])
    assert scores == [1.0, 1.0, 0.0, 0.0]
    assert choice.answer == "B" and "Options:" not in choice.messages[0]["content"][-1]["text"]  # listed already


def test_options_listed_in_the_question_are_not_listed_twice(tmp_path):
    question = "Which particle is heavier?\n\nA. electron\nB. proton\nC. photon\nD. neutrino"
    rows = [{"prompt": [{"from": "user", "value": question}], "final_answer": "B",
             "choices": {"A": "electron", "B": "proton", "C": "photon", "D": "neutrino"}}]
    (record,) = load_records(_write(tmp_path / "gpqa.json", rows), style="eval")
    text = record.messages[0]["content"]
    assert text.count("proton") == 1 and "Options:" not in text and grade(A("B"), "B", record.options) == 1.0


def test_medqa_original_with_five_options(tmp_path):
    rows = [{"question": "A 23-year-old ... Which is the most likely diagnosis?", "answer": "Nitrofurantoin",
             "options": {"A": "Ampicillin", "B": "Ceftriaxone", "C": "Doxycycline", "D": "Nitrofurantoin",
                         "E": "Penicillin"}, "meta_info": "step2&3", "answer_idx": "D"}]
    (record,) = load_benchmark("medqa_original", _write(tmp_path / "test.jsonl", rows))
    assert record.answer == "D" and sorted(record.options) == list("ABCDE") and "E: Penicillin" in \
        record.messages[0]["content"]
    with pytest.raises(Exception, match="medqa_original: no hub copy"):
        load_benchmark("medqa_original")


def test_image_paths_relative_to_an_image_root(tmp_path):
    root = tmp_path / "OmniMedVQA"
    (root / "Images" / "ACRIMA").mkdir(parents=True)
    _image(root / "Images" / "ACRIMA" / "a.png", (5, 5, 5))
    qa = tmp_path / "OmniMedVQA" / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    rows = [{"question_id": "q1", "question": "Glaucoma?", "option_A": "yes", "option_B": "no", "gt_answer": "no",
             "image_path": "Images/ACRIMA/a.png"}]
    path = _write(qa / "ACRIMA.json", rows)
    with pytest.raises(Exception, match=r"row 0: image not found: .*QA_information/Open-access/Images/ACRIMA/a.png"):
        load_benchmark("omnimedvqa", path)
    (record,) = load_benchmark("omnimedvqa", path, image_root=str(root))
    assert record.answer == "B"
    assert evaluate.image_root(f"medxpertqa_mm=/x,omnimedvqa={root}", "omnimedvqa") == str(root)
    assert evaluate.image_root(str(root), "nejm") == str(root)


def test_medxpertqa_images_from_their_own_folder(tmp_path):
    (tmp_path / "images").mkdir()
    _image(tmp_path / "images" / "MM-1-a.jpeg", (7, 7, 7))
    rows = [{"id": "MM-1", "question": "What is it? Answer Choices: (A) A (B) C", "options": MEDXPERT_OPTIONS,
             "label": "E", "images": ["MM-1-a.jpeg"]}]
    (record,) = load_benchmark("medxpertqa_mm", _write(tmp_path / "mm.jsonl", rows), image_root=str(tmp_path / "images"))
    assert record.answer == "E" and grade(A("E"), record.answer, record.options) == 1.0
    assert grade(A("B"), record.answer, record.options) == 0.0  # "B" is option E's text, but a label of B


def test_damaged_golds_and_skipped_rows_are_counted_and_named(qwen2_single, tmp_path):
    assert damaged_gold("\x0crac{36}{13}") and damaged_gold(["1", "\x08eta"]) and not damaged_gold("\\frac{36}{13}")
    rows = [{"problem": "What is 36/13?", "answer": "\x0crac{36}{13}", "unique_id": "damaged"},
            {"problem": "What is 1+1?", "answer": "2", "unique_id": "fine"},
            {"problem": "What is 2+2?", "unique_id": "no-answer"}]
    data = _write(tmp_path / "math.jsonl", rows)
    common = ["--model", qwen2_single, "--benchmarks", f"math500={data}", "--max-tokens", "8", "--answer-tokens", "4",
              "--max-model-len", "512"]
    with pytest.raises(Exception, match=r"math.jsonl: row 2: missing field 'answer'"):
        evaluate.main(common + ["--output-dir", str(tmp_path / "a")])
    (summary,) = evaluate.main(common + ["--output-dir", str(tmp_path / "b"), "--skip-bad-rows"])
    assert summary["n"] == 2 and summary["skipped_rows"] == 1 and "row 2: missing field 'answer'" in summary["skipped"][0]
    assert summary["n_damaged_golds"] == 1 and summary["damaged_golds"] == ["damaged"]
