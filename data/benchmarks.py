"""The paper's evaluation benchmarks (§4.1): where each comes from and how its rows become Records.

`load_benchmark(name, path=None, limit=None)` loads by hub id, or from a local JSON/JSONL/Parquet file
in the hub schema when `path` is given. Images in local files are paths relative to the file, or
{"bytes": ..., "path": ...} dicts as the hub's Parquet exports store them.

OmniMedVQA and NEJM Image Challenge have no hub copy; they load from local files only:
- OmniMedVQA (the official QA JSON): question_id, question, option_A..option_D, gt_answer (the
  correct option's text), image_path.
- NEJM Image Challenge: id, question, options ({"A": ..., "E": ...}), answer (a letter), image (path).
MedQA with its original five options ("medqa_original") loads from MedQA's US test.jsonl: question,
options ({"A": ..., "E": ...}), answer (text), answer_idx (letter), meta_info. GPQA ("gpqa") loads from
Open-Reasoner-Zero's data/eval_data/gpqa_diamond.json (prompt, final_answer, choices).
MathVista's official testmini.json holds no `query`: its data/query.json, beside it, is read for them.

Images given as paths are relative to the data file's folder, or to `image_root`: OmniMedVQA's
image_path is relative to the dataset root, and MedXpertQA's image names to the folder its separate
image archive unpacks to.
"""
from __future__ import annotations

import ast
import io
import json
import os
import re

from data.loaders import LETTERS, convert_each, convert_rows, hub_rows, read_rows, resolve_image_paths
from data.prompts import user_messages
from data.records import DataError, Record

MMMU_SUBJECTS = [
    "Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory", "Basic_Medical_Science",
    "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science", "Design", "Diagnostics_and_Laboratory_Medicine",
    "Economics", "Electronics", "Energy_and_Power", "Finance", "Geography", "History", "Literature", "Manage",
    "Marketing", "Materials", "Math", "Mechanical_Engineering", "Music", "Pharmacy", "Physics", "Psychology",
    "Public_Health", "Sociology"]
HEALTH_SUBJECTS = {"Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy",
                   "Public_Health"}


def _image(value, base_dir: str):
    """A PIL image from a hub value (PIL), a {"bytes", "path"} dict, or a path relative to base_dir (the
    data file's folder, or --image-root)."""
    from PIL import Image

    if value is None:
        raise ValueError("no image (every item of this benchmark has one)")
    if hasattr(value, "convert"):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        value = value.get("path")
        if not value:
            raise ValueError("an image field holds neither bytes nor a path")
    if not isinstance(value, str):
        raise ValueError(f"an image field holds {type(value).__name__}: expected a file name, a path, "
                         "an image or a {\"bytes\", \"path\"} dict")
    path = value if os.path.isabs(value) else os.path.join(base_dir, value)
    if not os.path.exists(path):
        raise ValueError(f"image not found: {path} (set the folder images are relative to with --image-root)")
    return Image.open(path).convert("RGB")


def _choice_record(item_id, question, options, answer, images, meta=None, image_labels=None) -> Record:
    if answer not in options:
        raise ValueError(f"answer {answer!r} is not one of the options {sorted(options)}")
    return Record(id=str(item_id), messages=user_messages(question, options, "eval", images, image_labels),
                  answer=answer, kind="choice", options=options, meta=meta or {})


def _math_record(item_id, question, answer, images, meta=None, image_labels=None) -> Record:
    golds = answer if isinstance(answer, list) else [answer]
    if not golds or not all(isinstance(g, str) and g.strip() for g in golds):
        raise ValueError("no gold answer")
    answer = [g.strip() for g in golds] if len(golds) > 1 else golds[0].strip()
    return Record(id=str(item_id), messages=user_messages(question, None, "eval", images, image_labels),
                  answer=answer, meta=meta or {})


def _as_list(value) -> list:
    """A list from a hub value that may be a list or a string holding a Python list."""
    return ast.literal_eval(value) if isinstance(value, str) else list(value)


def _mmmu(row, base_dir):
    options = _as_list(row["options"])
    if len(options) == 1 and isinstance(options[0], list):  # MMMU-Pro stores a few as [[...]]
        options = options[0]
    options = {LETTERS[i]: str(o) for i, o in enumerate(options)}
    # Images in the order the question and options refer to them ("<image 3>"), each labelled so that
    # "C: <image 3>" means something to the model; images that no marker names come last.
    named = [int(n) for n in re.findall(r"<image (\d+)>", row["question"] + " " + " ".join(options.values()))]
    order = list(dict.fromkeys(named + list(range(1, 8))))
    missing = [n for n in dict.fromkeys(named) if row.get(f"image_{n}") is None]
    if missing:
        raise ValueError(f"the question or options name <image {missing[0]}> but the row has no image_{missing[0]}")
    order = [n for n in order if row.get(f"image_{n}") is not None]
    images = [_image(row[f"image_{n}"], base_dir) for n in order]
    meta = {"subject": row.get("subject") or row["id"].split("_", 1)[-1].rsplit("_", 1)[0]}
    labels = [f"<image {n}>" for n in order]
    answer = row["answer"]
    if options and row.get("question_type", "multiple-choice") == "multiple-choice":
        return _choice_record(row["id"], row["question"], options, str(answer).strip(), images, meta, labels)
    if isinstance(answer, str) and answer.strip().startswith("["):  # a list of accepted answers
        answer = [str(a) for a in _as_list(answer)]
    return _math_record(row["id"], row["question"], answer, images, meta, labels)


def _mathvista(row, base_dir):
    images = [_image(row.get("decoded_image") or row.get("image"), base_dir)]
    # `query` is the question with the benchmark's own answer-format hint (precision, unit, option letters)
    if not row.get("query"):
        raise ValueError("no `query` (MathVista's question with its answer-format hint: a field of the hub's rows; "
                         "the official repository keeps it in data/query.json, read from beside testmini.json)")
    question = row["query"]
    if row["question_type"] == "multi_choice":
        options = {LETTERS[i]: str(c) for i, c in enumerate(row["choices"])}
        answer = next((k for k, v in options.items() if v == str(row["answer"])), None)
        if answer is None:
            raise ValueError(f"answer {row['answer']!r} is not one of the choices")
        return _choice_record(row["pid"], question, options, answer, images)
    meta = {"precision": int(row["precision"])} if row.get("answer_type") == "float" and \
        row.get("precision") is not None else {}
    return _math_record(row["pid"], question, str(row["answer"]), images, meta)


# MathVision's options that are pictures (<image2> ... <image6>): the row has one image, with them drawn in it
OPTION_IN_IMAGE = "(drawn in the image)"


def _mathvision(row, base_dir):
    images = [_image(row.get("decoded_image") or row.get("image"), base_dir)]
    question = re.sub(r"<image\d*>", "", row["question"]).strip()
    if row.get("options"):
        drawn = all(re.fullmatch(r"<image\d+>", str(o).strip()) for o in row["options"])
        options = {LETTERS[i]: OPTION_IN_IMAGE if drawn else str(o) for i, o in enumerate(row["options"])}
        return _choice_record(row["id"], question, options, str(row["answer"]).strip(), images,
                              {"options_in_image": True} if drawn else None)
    return _math_record(row["id"], question, str(row["answer"]), images)


def _mmstar(row, base_dir):
    # MMStar puts its options inside the question: "...\nOptions: A: x, B: y, C: z, D: w"
    question, _, tail = row["question"].partition("Options:")
    parts = re.split(r"(?:^|,\s*)([A-F]):\s*", tail.strip())
    options = {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}
    return _choice_record(row["index"], question.strip(), options, str(row["answer"]).strip(),
                          [_image(row["image"], base_dir)], {"category": row.get("category")})


def _medxpertqa(row, base_dir):
    """The hub's rows and the repository's (MM/test.jsonl), or its evaluation input
    (eval/data/medxpertqa/input/medxpertqa_mm_input.jsonl: options as [{"letter", "content"}], the label as
    a one-letter list, images as [{"image_path"}])."""
    question = row["question"].split("Answer Choices:")[0].strip()
    if not row.get("images") or not isinstance(row["images"], list):
        raise ValueError("`images` must list the item's images (the repository's file names, or the hub's "
                         f"image objects), got {row.get('images')!r}")
    images = [_image(image["image_path"] if isinstance(image, dict) and "image_path" in image else image, base_dir)
              for image in row["images"]]
    options = row["options"]
    if isinstance(options, list):
        options = {option["letter"]: option["content"] for option in options}
    label = row["label"]
    if isinstance(label, list):
        if len(label) != 1:
            raise ValueError(f"label {label!r}: expected one option")
        label = label[0]
    return _choice_record(row["id"], question, dict(options), str(label).strip(), images)


def _omnimedvqa(row, base_dir):
    options = {L: row[f"option_{L}"] for L in "ABCD" if row.get(f"option_{L}") is not None}
    answer = next((k for k, v in options.items() if v == row["gt_answer"]), None)
    if answer is None:
        raise ValueError(f"gt_answer {row['gt_answer']!r} is not one of the options")
    return _choice_record(row["question_id"], row["question"], options, answer,
                          [_image(row["image_path"], base_dir)])


def _nejm(row, base_dir):
    return _choice_record(row["id"], row["question"], dict(row["options"]), str(row["answer"]).strip(),
                          [_image(row["image"], base_dir)])


# name -> (text format | image converter, hub id, configs, split, row filter)
BENCHMARKS = {
    "gsm8k": ("gsm8k", "openai/gsm8k", ["main"], "test", None),
    "mmlu_pro": ("mmlu_pro", "TIGER-Lab/MMLU-Pro", [None], "test", None),
    "mmlu_pro_health": ("mmlu_pro", "TIGER-Lab/MMLU-Pro", [None], "test", lambda row: row.get("category") == "health"),
    "math500": ("math500", "HuggingFaceH4/MATH-500", [None], "test", None),
    "medqa": ("medqa", "GBaker/MedQA-USMLE-4-options", [None], "test", None),
    "medqa_original": ("medqa", None, [None], None, None),  # MedQA's US test.jsonl, options A-E (local file)
    "mmmu": (_mmmu, "MMMU/MMMU", MMMU_SUBJECTS, "validation", None),
    "mmmu_health": (_mmmu, "MMMU/MMMU", sorted(HEALTH_SUBJECTS), "validation",
                    lambda row: any(s in row["id"] for s in HEALTH_SUBJECTS)),
    "mmmu_pro": (_mmmu, "MMMU/MMMU_Pro", ["standard (10 options)"], "test", None),
    "mmmu_pro_health": (_mmmu, "MMMU/MMMU_Pro", ["standard (10 options)"], "test",
                        lambda row: row.get("subject", "").replace(" ", "_") in HEALTH_SUBJECTS),
    "mathvista": (_mathvista, "AI4Math/MathVista", [None], "testmini", None),
    "mathvision": (_mathvision, "MathLLMs/MathVision", [None], "test", None),
    "mmstar": (_mmstar, "Lin-Chen/MMStar", [None], "val", None),
    "medxpertqa_mm": (_medxpertqa, "TsinghuaC3I/MedXpertQA", ["MM"], "test", None),
    "gpqa": ("orz_eval", None, [None], None, None),  # Open-Reasoner-Zero's data/eval_data/gpqa_diamond.json
    "records": ("records", None, [None], None, None),  # a local JSONL of this project's Records, prompts as given
    "omnimedvqa": (_omnimedvqa, None, [None], None, None),
    "nejm": (_nejm, None, [None], None, None),
}


# The paper's numbers, in %, kept here once (evaluate.py's results.md sets ours beside them). Greedy: Fig. 1, and Table
# 5 for MathVista and MathVision (Table 5 gives MMMU's baseline as 53.0, Fig. 1 as 53.2). mean@5 at temperature 0.3
# (avg@5): the bars of Figs. 3-4 that match table entries (Tables 1, 3, 4, 9).
PAPER_MODELS = ("Qwen2.5-VL-7B-Instruct", "X-Reasoner", "X-Reasoner-Med")
PAPER_GREEDY = {
    "gsm8k": {"Qwen2.5-VL-7B-Instruct": 84.9, "X-Reasoner": 88.2},
    "mmlu_pro": {"Qwen2.5-VL-7B-Instruct": 47.6, "X-Reasoner": 52.6},
    "mmmu": {"Qwen2.5-VL-7B-Instruct": 53.2, "X-Reasoner": 56.4},
    "mmmu_pro": {"Qwen2.5-VL-7B-Instruct": 38.7, "X-Reasoner": 43.0},
    "mathvista": {"Qwen2.5-VL-7B-Instruct": 62.8, "X-Reasoner": 69.0},
    "mathvision": {"Qwen2.5-VL-7B-Instruct": 25.0, "X-Reasoner": 29.6},
    "medqa": {"Qwen2.5-VL-7B-Instruct": 56.3, "X-Reasoner": 62.3, "X-Reasoner-Med": 72.4},
    "mmlu_pro_health": {"Qwen2.5-VL-7B-Instruct": 47.8, "X-Reasoner": 51.3, "X-Reasoner-Med": 58.7},
    "mmmu_health": {"Qwen2.5-VL-7B-Instruct": 56.7, "X-Reasoner": 60.0, "X-Reasoner-Med": 64.0},
    "medxpertqa_mm": {"Qwen2.5-VL-7B-Instruct": 22.2, "X-Reasoner": 23.8, "X-Reasoner-Med": 26.4},
}
PAPER_MEAN_AT_5 = {
    "mmlu_pro": {"Qwen2.5-VL-7B-Instruct": 47.6, "X-Reasoner": 53.3},
    "mmmu_pro": {"Qwen2.5-VL-7B-Instruct": 38.3, "X-Reasoner": 42.5},
    "gsm8k": {"Qwen2.5-VL-7B-Instruct": 86.0},
    "mathvision": {"Qwen2.5-VL-7B-Instruct": 24.7},
    "mmlu_pro_health": {"Qwen2.5-VL-7B-Instruct": 47.8, "X-Reasoner": 53.1},
    "nejm": {"Qwen2.5-VL-7B-Instruct": 41.8, "X-Reasoner": 45.7},
    "omnimedvqa": {"Qwen2.5-VL-7B-Instruct": 57.4},
    "medqa": {"Qwen2.5-VL-7B-Instruct": 50.5},
    "mmmu_pro_health": {"Qwen2.5-VL-7B-Instruct": 34.3},
}


def _with_mathvista_queries(rows: list, base_dir: str) -> list:
    """The official repository's testmini.json with each row's `query` from data/query.json beside it (pid ->
    query); rows that already hold one (the hub's) are kept as they are."""
    path = os.path.join(base_dir, "query.json")
    if all(isinstance(row, dict) and row.get("query") for row in rows) or not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as fh:
        queries = json.load(fh)
    return [{**row, "query": row.get("query") or queries.get(str(row.get("pid")))} if isinstance(row, dict) else row
            for row in rows]


def load_benchmark(name: str, path: str | None = None, limit: int | None = None, image_root: str | None = None,
                   bad_rows: list | None = None) -> list[Record]:
    """The benchmark's records. image_root: the folder image paths are relative to (default: the data
    file's folder). bad_rows: skip rows that cannot be read and append their messages here (default:
    the first bad row raises DataError naming it)."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    converter, hub_id, configs, split, keep = BENCHMARKS[name]
    if path is not None:
        rows, origin, base_dir = read_rows(path), path, os.path.dirname(os.path.abspath(path))
        if name == "mathvista":
            rows = _with_mathvista_queries(rows, base_dir)
    elif hub_id is None:
        raise DataError(f"{name}: no hub copy; give a local file as {name}=PATH (schema in data/benchmarks.py)")
    else:
        rows = [row for config in configs for row in hub_rows(
            hub_id, config, split, f"give a local copy as {name}=PATH (JSON, JSONL or Parquet in the hub's fields)")]
        origin, base_dir = hub_id, os.getcwd()
    if keep is not None:
        rows = [row for row in rows if keep(row)]
    if limit is not None:
        rows = rows[:limit]
    if not callable(converter):
        records = convert_rows(rows, converter, origin, style="eval", bad_rows=bad_rows)
        if converter == "records":
            resolve_image_paths(records, image_root or base_dir, origin)
        return records
    base_dir = image_root or base_dir
    return convert_each(rows, lambda row, _: converter(row, base_dir), origin, name, bad_rows)
