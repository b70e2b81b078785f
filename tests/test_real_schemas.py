"""Benchmarks and grading on rows in the real data sets' schemas, with the structures that broke them:
letters as option texts, nested option lists, image options, answer-format hints, list golds, options
already in the question, five-option MedQA, image roots, damaged golds. Rows are written here."""
import json
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
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
@pytest.mark.parametrize("prediction", ["B", "(B)", "B.", "B: TEXT", "\\boxed{B}", "Option B", "(B) TEXT"])
def test_a_label_wins_over_an_option_text_that_is_a_letter(options, prediction):
    assert grade(A(prediction.replace("TEXT", options["B"])), "B", options) == 1.0  # the label with its own text
    if "TEXT" in prediction:  # the label with another option's text: they disagree, whatever the separator
        other = next(text for letter, text in options.items() if letter != "B" and text != "B")
        assert grade(A(prediction.replace("TEXT", other)), "B", options) == 0.0


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


# --- the classes of real rows that graded or loaded wrongly (issue: grading and benchmark files) ----------

@pytest.mark.parametrize("prediction, gold, expected", [
    ("\\frac{14}{3}:1", "\\frac{14}{3}", 0), ("\\frac{7}{2}:1", "\\frac{7}{2}", 0), ("\\sqrt{2}:1", "\\sqrt{2}", 0),
    ("4:1", "4", 0), ("\\boxed{4:1}", "\\frac{4}{1}", 0),  # a ratio equals only a ratio
    ("\\boxed{4:1}", "4:1", 1), ("\\text{4:1}", "4:1", 1), ("$4:1$", "4:1", 1), ("\\text{ 4 : 1 }", "4:1", 1),
    ("\\text{1:4}", "4:1", 0), ("\\boxed{3:1}", "4:1", 0),
    ("\\frac{28}{6}:1", "\\frac{14}{3}:1", 1), ("\\frac{14}{3}:2", "\\frac{14}{3}:1", 0), ("2:3:4", "2:3:4", 1),
    ("2:3", "2:3:4", 0),
])
def test_a_ratio_is_compared_term_by_term_whatever_wraps_it(prediction, gold, expected):
    assert grade(A(prediction), gold) == expected


MATH_MODE_OPTIONS = {"A": "$2 \\cdot 4 \\cdot 3$", "B": "$2 \\cdot 4$", "C": "\\text{7}", "D": "\\text{none of these}"}


@pytest.mark.parametrize("prediction, gold, expected", [
    ("$2 \\cdot 4 \\cdot 3$", "A", 1), ("2 \\cdot 4 \\cdot 3", "A", 1), ("\\boxed{2 \\cdot 4 \\cdot 3}", "A", 1),
    ("24", "A", 1), ("\\boxed{24}", "A", 1), ("8", "B", 1), ("7", "C", 1), ("none of these", "D", 1),
    ("\\text{none of these}", "D", 1), ("A", "A", 1),
    ("8", "A", 0), ("25", "A", 0), ("2 \\cdot 4", "A", 0), ("24", "B", 0), ("none", "D", 0),
])
def test_option_texts_in_math_mode_match_their_text_and_their_value(prediction, gold, expected):
    assert grade(A(prediction), gold, MATH_MODE_OPTIONS) == expected


def test_a_value_equal_to_two_options_picks_neither():
    options = {"A": "$4!$", "B": "$2 \\cdot 12$", "C": "$5$", "D": "$6$"}
    assert grade_many([A("24"), A("24"), A("5"), A("4!")], ["A", "B", "C", "A"], [options] * 4) == [0, 0, 1, 1]


GENETICS_OPTIONS = {"A": "XAXa", "B": "XAXA", "C": "XaXa", "D": "XaY"}


def test_options_that_differ_only_in_case_are_told_apart():
    predictions = ["XAXA", "XaXa", "XAXa", "XaY", "xay", "XAXA.", "xaxa", "xaxa", "xaxa", "XAXA", "XaXa"]
    golds = ["B", "C", "A", "D", "D", "B", "A", "B", "C", "A", "B"]
    expected = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]  # case folded only where it picks one option
    assert grade_many([A(p) for p in predictions], golds, [GENETICS_OPTIONS] * len(golds)) == expected


DIARRHOEA_OPTIONS = {"A": "Staphylococcus aureus enterotoxin", "B": "Norovirus", "C": "Clostridioides difficile",
                     "D": "Ischemic colitis"}


@pytest.mark.parametrize("prediction, gold, expected", [
    ("C. difficile toxin A and B", "C", 0), ("A patient with this history needs stool testing", "A", 0),
    ("A 2-day course", "A", 0), ("D is unlikely", "D", 0),  # a word of a sentence, not a label
    ("C. Clostridioides difficile", "C", 1), ("C. Clostridioides difficile, given the antibiotics", "C", 1),
    ("C Clostridioides difficile", "C", 1), ("C. Clostridioides", "C", 1), ("C: the toxin", "C", 1),
    ("(C) because of the antibiotics", "C", 1), ("C) toxin", "C", 1), ("Option C, the toxin", "C", 1), ("C", "C", 1),
    ("C.", "C", 1), ("Norovirus", "B", 1), ("A. Norovirus", "B", 0),
])
def test_a_leading_article_or_abbreviation_is_not_a_label(prediction, gold, expected):
    assert grade(A(prediction), gold, DIARRHOEA_OPTIONS) == expected


@pytest.mark.parametrize("prediction, expected", [
    ("1.21", 1), ("\\boxed{1.21}", 1), ("x = 1.21", 1), ("1.21 cm", 1), ("1.21\\text{ cm}", 1), ("$1.21$", 1),
    ("1.214", 1), ("\\boxed{1.214}", 1), ("l = 1.214 cm", 1), ("1.21^\\circ", 1),
    ("1.24", 0), ("\\boxed{1.24}", 0), ("x = 1.24", 0), ("1.24 cm", 0), ("1.2", 0), ("12.1", 0),
])
def test_a_stated_precision_applies_to_every_form_of_a_number(prediction, expected):
    assert grade_many([A(prediction)], ["1.21"], precisions=[2]) == [expected]


def _mathvista_row(pid, image, **fields):
    row = {"pid": pid, "question": "How long is the bar?", "image": image, "choices": None, "unit": None,
           "precision": 1.0, "answer": "1.2", "question_type": "free_form", "answer_type": "float",
           "pid_source": "figureqa", "metadata": {"split": "testmini", "language": "english"},
           "query": "Hint: Please answer the question requiring a floating-point number with one decimal place.\n"
                    "Question: How long is the bar?"}
    return {**row, **fields}


def test_mathvistas_official_testmini_json_loads_with_the_query_json_beside_it(tmp_path):
    """The official repository's data/testmini.json: one JSON object keyed by pid, images as paths under images/,
    and no `query`, which data/query.json holds (pid -> query)."""
    (tmp_path / "images").mkdir()
    rows, queries = {}, {}
    for pid in ("1", "2", "3"):
        _image(tmp_path / "images" / f"{pid}.jpg", (3, 3, 3))
        row = _mathvista_row(pid, f"images/{pid}.jpg", precision=1, metadata={
            "split": "testmini", "language": "english", "img_width": 32, "img_height": 32, "source": "FigureQA"})
        queries[pid] = row.pop("query")
        row.pop("pid_source")
        rows[pid] = row
    path = tmp_path / "testmini.json"
    path.write_text(json.dumps(rows, indent=4))
    with pytest.raises(Exception, match=r"testmini.json: row 0: no `query` .*data/query.json, read from beside "
                                        r"testmini.json"):
        load_benchmark("mathvista", str(path))  # the pair is not complete yet
    (tmp_path / "query.json").write_text(json.dumps(queries, indent=4))
    records = load_benchmark("mathvista", str(path))
    assert [r.id for r in records] == ["1", "2", "3"] and all(r.meta == {"precision": 1} for r in records)
    assert records[0].messages[0]["content"][1]["image"].size == (32, 32)
    assert records[0].messages[0]["content"][-1]["text"] == queries["1"]


def test_rows_that_would_become_silent_text_only_prompts_are_errors(tmp_path):
    image = _image(tmp_path / "m.png", (1, 1, 1))
    no_query = _write(tmp_path / "mv.jsonl", [_mathvista_row("1", image), _mathvista_row("2", image, query=None)])
    with pytest.raises(Exception, match=r"mv.jsonl: row 1: no `query`"):
        load_benchmark("mathvista", no_query)
    no_image = _write(tmp_path / "mv2.jsonl", [_mathvista_row("1", None)])
    with pytest.raises(Exception, match=r"mv2.jsonl: row 0: no image"):
        load_benchmark("mathvista", no_image)
    rows = [{"id": "validation_Art_1", "question": "<image 1> What style is this?", "options": "['a', 'b']",
             "answer": "A", "image_1": image},
            {"id": "validation_Art_2", "question": "<image 1> What style is this?", "options": "['a', 'b']",
             "answer": "A", "image_1": None}]
    mmmu = _write(tmp_path / "mmmu.jsonl", rows)
    with pytest.raises(Exception, match=r"mmmu.jsonl: row 1: the question or options name <image 1> but the row "
                                        r"has no image_1"):
        load_benchmark("mmmu", mmmu)
    skipped = []
    assert [r.id for r in load_benchmark("mmmu", mmmu, bad_rows=skipped)] == ["validation_Art_1"]
    assert len(skipped) == 1 and "row 1" in skipped[0]


def test_medxpertqa_rows_from_the_repository_and_from_the_hub(tmp_path):
    (tmp_path / "images").mkdir()
    name = _image(tmp_path / "images" / "MM-26-a.jpeg", (7, 7, 7))
    question = ("A 5-year-old has this rash. What is the most probable diagnosis?\nAnswer Choices: (A) Erythema "
                "infectiosum (B) Cutaneous larva migrans (C) Cold agglutinin disease (D) Cutis marmorata (E) Erythema "
                "ab igne")
    options = {"A": "Erythema infectiosum", "B": "Cutaneous larva migrans", "C": "Cold agglutinin disease",
               "D": "Cutis marmorata", "E": "Erythema ab igne"}
    repository = {"id": "MM-26", "question": question, "options": options, "label": "C", "images": [name],
                  "medical_task": "Diagnosis", "body_system": "Lymphatic", "question_type": "Reasoning"}
    (from_repository,) = load_benchmark("medxpertqa_mm", _write(tmp_path / "mm.jsonl", [repository]),
                                        image_root=str(tmp_path / "images"))
    hub = {**repository, "images": [{"bytes": (tmp_path / "images" / name).read_bytes(), "path": None}]}
    pq.write_table(pa.Table.from_pylist([hub]), tmp_path / "test-00000.parquet")
    (from_hub,) = load_benchmark("medxpertqa_mm", str(tmp_path / "test-00000.parquet"))
    for record in (from_repository, from_hub):
        assert record.answer == "C" and "Answer Choices" not in str(record.messages)
        assert record.messages[0]["content"][1]["image"].getpixel((0, 0)) == (7, 7, 7)
    for bad, message in [({"images": None}, "`images` must list"),
                         ({"images": [{"bytes": None, "path": None}]}, "an image field holds neither bytes nor a path")]:
        with pytest.raises(Exception, match=rf"bad.jsonl: row 0: {message}"):
            load_benchmark("medxpertqa_mm", _write(tmp_path / "bad.jsonl", [{**repository, **bad}]))


def test_the_skipped_count_stands_beside_the_accuracy():
    table = evaluate.format_table([{"benchmark": "nejm", "n": 9, "skipped_rows": 2, "accuracy": 0.5},
                                   {"benchmark": "gsm8k", "n": 5, "skipped_rows": 0, "accuracy": 0.2}])
    assert table.splitlines()[0].split() == ["benchmark", "n", "skipped_rows", "accuracy"]
    assert table.splitlines()[1].split() == ["nejm", "9", "2", "0.5000"]
    assert "skipped" not in evaluate.format_table([{"benchmark": "gsm8k", "n": 5, "skipped_rows": 0, "accuracy": 0.2}])


def _one_line(main, argv) -> str:
    """The error a stage's entry point (data.records.run_script) ends in for argv: one line, no traceback."""
    from data.records import run_script
    with pytest.raises(SystemExit) as stopped:
        run_script(lambda: main(argv))
    message = str(stopped.value.code)
    assert "\n" not in message
    return message


def test_bad_input_ends_in_one_line(qwen2_single, tmp_path, monkeypatch):
    import datasets

    import distill
    import grpo
    import sft
    # every row skipped: an error naming the benchmark, the count and the first reason, never "accuracy 0.0"
    image = _image(tmp_path / "x.png", (1, 1, 1))
    rows = [{"id": f"n{i}", "question": "What is shown?", "options": {"A": "rash", "B": "fracture"}, "answer": "A",
             "image": image} for i in range(3)]
    nejm = _write(tmp_path / "nejm.jsonl", rows)
    out = ["--output-dir", str(tmp_path / "o")]
    wrong_root = _one_line(evaluate.main, ["--model", qwen2_single, "--benchmarks", f"nejm={nejm}", "--skip-bad-rows",
                                           "--image-root", str(tmp_path / "elsewhere"), *out])
    # a records file naming a missing image
    record = {"id": "r1", "messages": [{"role": "user", "content": [{"type": "image", "image": "gone.png"},
                                                                   {"type": "text", "text": "What is shown?"}]}],
              "answer": "A", "kind": "choice", "options": {"A": "rash", "B": "fracture"}}
    records = _write(tmp_path / "mine.jsonl", [record])
    missing_image = _one_line(evaluate.main, ["--model", qwen2_single, "--benchmarks", f"records={records}", *out])
    # a context longer than the model's own (the tiny model: 4,096 positions)
    gsm8k = _write(tmp_path / "gsm8k.jsonl", [{"question": "1+1?", "answer": "so\n#### 2"}])
    too_long = _one_line(evaluate.main, ["--model", qwen2_single, "--benchmarks", f"gsm8k={gsm8k}", "--max-model-len",
                                         "100000", *out])
    # a benchmark from the hub without network (datasets raises as it does offline)
    def offline(hub_id, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{hub_id}' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    no_network = _one_line(evaluate.main, ["--model", qwen2_single, "--benchmarks", "gsm8k", *out])
    for message, expected in [
            (wrong_root, rf"^error: nejm: all 3 rows were skipped as unreadable; the first: .*nejm.jsonl: row 0: image "
                         rf"not found: {tmp_path / 'elsewhere' / 'x.png'}"),
            (missing_image, rf"^error: .*mine.jsonl: record r1: image not found: {tmp_path / 'gone.png'}$"),
            (too_long, r"^error: --max-model-len: 100000 tokens is above .*qwen2-single's maximum context length "
                       r"\(max_position_embeddings=4096\)$"),
            (no_network, r"^error: cannot load openai/gsm8k from the hub \(ConnectionError: Couldn't reach "
                         r"'openai/gsm8k' on the Hub \(LocalEntryNotFoundError\)\); give a local copy as gsm8k=PATH "
                         r"\(JSON, JSONL or Parquet in the hub's fields\)$")]:
        assert re.match(expected, message), message
    # a model that is neither a directory nor on the hub, in every stage, before anything loads
    data = ["--data", gsm8k, *out]
    for main, argv in [(sft.main, ["--model", "/nonexistent", *data]), (grpo.main, ["--model", "/nonexistent", *data]),
                       (evaluate.main, ["--model", "/nonexistent", "--benchmarks", f"gsm8k={gsm8k}", *out]),
                       (distill.main, ["--teacher", "/nonexistent", "--data", gsm8k, "--output", str(tmp_path / "d")])]:
        flag = "--teacher" if main is distill.main else "--model"
        assert re.match(rf"^error: {flag} /nonexistent: no such directory, and the hub does not provide it \(.+\); "
                        r"give a model directory, or a hub id \(org/name\) with network access$",
                        _one_line(main, argv)), main
    assert re.match(rf"^error: --model {tmp_path}: the directory holds no config.json",
                    _one_line(sft.main, ["--model", str(tmp_path), *data]))


# --- grading, third pass: answer forms real models write (issue: grading, third pass) ------------------------

MATHVISTA_PID_5 = {"A": "97", "B": "102", "C": "107", "D": "122"}  # "Find $m\\angle H$", gold 97


@pytest.mark.parametrize("prediction, expected", [
    ("A. $\\Delta, \\square, \\bullet$", 1), ("A: $\\Delta, \\square, \\bullet$", 1),
    ("(A) \\Delta, \\square, \\bullet", 1), ("$\\Delta, \\square, \\bullet$", 1), ("A", 1),
    ("B. $\\Delta, \\square, \\bullet$", 0), ("A. $\\square, \\Delta, \\bullet$", 0),
])
def test_a_label_then_an_option_text_in_math_mode_is_read(prediction, expected):
    options = {"A": "$\\Delta, \\square, \\bullet$", "B": "$\\square, \\Delta, \\bullet$",
               "C": "$\\bullet, \\Delta, \\square$", "D": "$\\Delta, \\bullet, \\square$"}
    assert grade(A(prediction), "A", options) == expected


@pytest.mark.parametrize("separator", ["{} ", "{}. ", "({}) ", "{}) ", "{}: ", "{} - ", "Option {} ", "**{}** "])
def test_a_label_and_its_text_must_agree_whatever_the_separator(separator):
    """The rule: a label followed by the text (or the value) of another option is wrong; with its own, right."""
    label = separator.format
    assert grade(A(label("A") + "97"), "A", MATHVISTA_PID_5) == 1.0
    assert grade(A(label("A") + "102"), "A", MATHVISTA_PID_5) == 0.0  # A with B's value
    assert grade(A(label("B") + "97"), "A", MATHVISTA_PID_5) == 0.0  # the value is the gold's, the label is not
    assert grade(A(label("B") + "102"), "B", MATHVISTA_PID_5) == 1.0
    assert grade(A(label("A") + "\\boxed{97}"), "A", MATHVISTA_PID_5) == 1.0
    assert grade(A(label("A") + "97.0"), "A", MATHVISTA_PID_5) == 1.0  # by value: math-verify's 97.0 = 97
    assert grade(A(label("A") + "102.0"), "A", MATHVISTA_PID_5) == 0.0


def test_a_value_or_prose_after_a_label_is_not_taken_for_another_option():
    options = {"A": "1", "B": "2", "C": "3", "D": "4"}
    assert grade_many([A("C. 1 and 2 together"), A("2"), A("B. 2"), A("C. 2")], ["B"] * 4, [options] * 4) == \
        [0, 1, 1, 0]


@pytest.mark.parametrize("prediction", ["(A) or (C)", "(C) or (A)", "Option A or Option C", "Option C or Option A",
                                        "A: 97; or possibly C: 107", "C: 107; or possibly A: 97", "A) 97, C) 107",
                                        "(A), not (C)"])
def test_an_answer_naming_two_options_is_wrong_whichever_comes_first(prediction):
    assert grade(A(prediction), "A", MATHVISTA_PID_5) == 0.0
    assert grade(A(prediction), "C", MATHVISTA_PID_5) == 0.0


def test_an_options_text_that_names_labels_is_not_a_hedge():
    options = {"A": "Only (B)", "B": "Both (A) and (C)", "C": "Neither", "D": "All of the above"}
    assert grade_many([A("B. Both (A) and (C)"), A("Both (A) and (C)"), A("(B) Both (A) and (C)")], ["B"] * 3,
                      [options] * 3) == [1, 1, 1]


ASPIRIN = {"A": "Aspirin", "B": "Clopidogrel", "C": "Warfarin", "D": "Heparin"}


@pytest.mark.parametrize("prediction, gold, expected", [
    ("**A**", "A", 1), ("(a)", "A", 1), ("Option a", "A", 1), ("Answer: A", "A", 1), ("The answer is A", "A", 1),
    ("The correct option is (A).", "A", 1), ("A - Aspirin", "A", 1), ("Final answer: **A**", "A", 1),
    ("A \u2013 Aspirin", "A", 1), ("**A.** Aspirin", "A", 1),
    ("**B**", "A", 0), ("(b)", "A", 0), ("Answer: B", "A", 0), ("The correct option is (B).", "A", 0),
    ("A - Warfarin", "A", 0), ("B - Aspirin", "A", 0), ("Answer: Warfarin", "A", 0),
])
def test_the_wrappers_models_put_around_a_label(prediction, gold, expected):
    assert grade(A(prediction), gold, ASPIRIN) == expected


def test_an_exact_option_text_beats_a_shared_prefix():
    antibiotics = {"A": "Amoxicillin", "B": "Amoxicillin-clavulanic acid", "C": "Azithromycin", "D": "Doxycycline"}
    assert grade_many([A("B. Amoxicillin"), A("B. Amoxicillin-clavulanic acid"), A("A. Amoxicillin"),
                       A("B. Amoxicillin-clavulanic"), A("Amoxicillin")], ["B", "B", "A", "B", "A"],
                      [antibiotics] * 5) == [0, 1, 1, 1, 1]
    coagulation = {"A": "Increased PTT", "B": "Increased bleeding time", "C": "Decreased platelets", "D": "Increased PT"}
    assert grade_many([A("A. Increased PT"), A("A. Increased PT"), A("D. Increased PT"), A("A. Increased PTT")],
                      ["A", "D", "D", "A"], [coagulation] * 4) == [0, 0, 1, 1]


@pytest.mark.parametrize("prediction, gold, expected", [
    ("x = 58,500", "58,500", 1), ("58\\,500", "58500", 1), ("58{,}500", "58,500", 1), ("-50\\%", "-50", 1),
    ("50\\%", "50", 1), ("-50\\%", "-0.5", 1), ("\\text{084}", "084", 1), ("\\boxed{\\text{084}}", "084", 1),
    ("x = 58,501", "58,500", 0), ("58\\,500", "58,050", 0), ("-50\\%", "50", 0), ("50\\%", "-50", 0),
    ("\\text{085}", "084", 0), ("(3,400)", "(3, 400)", 1), ("1,000,000", "10^6", 1),
])
def test_number_forms(prediction, gold, expected):
    assert grade(A(prediction), gold) == expected


def test_the_time_limit_bounds_an_item_not_each_option_it_is_compared_with():
    """An adversarial value against a row of twelve math-looking options: twelve comparisons, one limit in all."""
    from data.grading import GradingPool
    options = {letter: f"${n}^{{{n}}}$" for letter, n in zip("ABCDEFGHIJKL", range(2, 14))}
    pool = GradingPool(workers=2, timeout=1.0)
    try:
        pool.grade([("1", "1")] * 2)  # the workers have started
        start = time.monotonic()
        scores = pool.grade([("10^{10^{10^{10}}}", form) for form in options.values()] + [("2", "2")],
                            items=[0] * 12 + [1])
        elapsed = time.monotonic() - start
    finally:
        pool.close()
    assert scores == [0.0] * 12 + [1.0]
    assert elapsed < 2 * 1.0 + 1.5  # one limit for the adversarial item (twelve limits over two workers: six)


def test_image_choice_items_get_the_choice_prompt_with_their_options(tmp_path):
    from data.prompts import CHOICE_TEMPLATE
    rows = [{"id": "n1", "question": "What is shown?", "options": {"A": "rash", "B": "fracture"}, "answer": "B",
             "image": _image(tmp_path / "x.png", (1, 1, 1))}]
    (record,) = load_benchmark("nejm", _write(tmp_path / "nejm.jsonl", rows))
    parts = record.messages[0]["content"]
    assert parts[0]["text"] == CHOICE_TEMPLATE.format(question="") and "Options:\n\nA: rash\nB: fracture" in parts[-1]["text"]


def test_mathvision_options_that_are_pictures_are_said_to_be_in_the_image(tmp_path):
    from data.benchmarks import OPTION_IN_IMAGE
    image = _image(tmp_path / "m.png", (4, 4, 4))
    rows = [{"id": "1", "question": "Which figure comes next? <image1>", "options": ["<image2>", "<image3>", "<image4>",
                                                                                 "<image5>", "<image6>"],
             "answer": "C", "image": image, "solution": None, "level": 2, "subject": "logic"},
            {"id": "2", "question": "How many? <image1>", "options": ["1", "2", "3", "4", "5"], "answer": "B",
             "image": image, "solution": None, "level": 1, "subject": "counting"}]
    drawn, plain = load_benchmark("mathvision", _write(tmp_path / "mv.jsonl", rows))
    assert set(drawn.options.values()) == {OPTION_IN_IMAGE} and drawn.meta == {"options_in_image": True}
    assert plain.options["B"] == "2" and plain.meta == {}
    assert grade(A("C"), drawn.answer, drawn.options) == 1.0 and grade(A("(C)"), "C", drawn.options) == 1.0


def test_gpqa_is_a_benchmark_of_the_open_reasoner_zero_file(tmp_path):
    rows = [{"prompt": [{"from": "user", "value": "Which particle is heavier?"}], "final_answer": "B",
             "choices": {"A": "electron", "B": "proton", "C": "photon", "D": "neutrino"}}]
    (record,) = load_benchmark("gpqa", _write(tmp_path / "gpqa_diamond.json", rows))
    assert record.kind == "choice" and record.answer == "B" and grade(A("B. proton"), "B", record.options) == 1.0
    with pytest.raises(Exception, match="gpqa: no hub copy; give a local file as gpqa=PATH"):
        load_benchmark("gpqa")


def test_medxpertqa_from_its_evaluation_input_file(tmp_path):
    """eval/data/medxpertqa/input/medxpertqa_mm_input.jsonl in the MedXpertQA repository."""
    (tmp_path / "images").mkdir()
    name = _image(tmp_path / "images" / "MM-0-a.jpeg", (9, 9, 9))
    row = {"id": "MM-0", "question": "Which step adds most stability?\nAnswer Choices: (A) LCL repair (B) Plication",
           "options": [{"letter": "A", "content": "LCL repair"}, {"letter": "B", "content": "Plication"}],
           "label": ["A"], "images": [{"image_path": name}], "medical_task": "Treatment"}
    (record,) = load_benchmark("medxpertqa_mm", _write(tmp_path / "medxpertqa_mm_input.jsonl", [row]),
                               image_root=str(tmp_path / "images"))
    assert record.answer == "A" and record.options == {"A": "LCL repair", "B": "Plication"}
    assert record.messages[0]["content"][1]["image"].getpixel((0, 0)) == (9, 9, 9)
