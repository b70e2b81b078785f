"""Map every data source of the recipe onto `Record`s.

`load_records(data, ...)` takes a local file or URL (JSON, JSONL or Parquet), a source name from
`SOURCES` (loaded from the hub by its id), or any hub id. A file's format is recognised from its
fields; `data_format` overrides that.
"""
from __future__ import annotations

import ast
import json
import os

from data.prompts import user_messages
from data.records import DataError, Record

# name -> (hub id, config, default split). The name is also the format of that source's rows.
SOURCES = {
    "openthoughts": ("open-thoughts/OpenThoughts-114k", "default", "train"),
    "openthoughts_metadata": ("open-thoughts/OpenThoughts-114k", "metadata", "train"),
    "orz_math": (None, None, "train"),  # the authors' orz_math_57k_collected.json: give its path or URL
    "orz_eval": (None, None, "test"),  # Open-Reasoner-Zero data/eval_data/*.json
    "medqa": ("GBaker/MedQA-USMLE-4-options", None, "train"),
    "mmlu_pro": ("TIGER-Lab/MMLU-Pro", None, "test"),
    "mmlu_pro_health": ("TIGER-Lab/MMLU-Pro", None, "test"),
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test"),
    "records": (None, None, "train"),  # this project's own JSONL (distill.py output, demo data)
}
FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# --- row converters: one per format; each raises KeyError/TypeError/ValueError on a bad row ----------

def _require_str(row: dict, key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise TypeError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field {key!r} is empty")
    return value


def _between(text: str, start: str, end: str) -> str | None:
    i = text.find(start)
    if i < 0:
        return None
    j = text.find(end, i + len(start))
    return text[i + len(start): j if j >= 0 else len(text)].strip()


def _openthoughts(row, index, style):
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError("empty conversation")
    user = next((t["value"] for t in turns if t["from"] == "user"), None)
    reply = next((t["value"] for t in turns if t["from"] == "assistant"), None)
    if not user or not reply:
        raise ValueError("conversation needs a user and an assistant turn")
    think = _between(reply, "<|begin_of_thought|>", "<|end_of_thought|>")
    solution = _between(reply, "<|begin_of_solution|>", "<|end_of_solution|>")
    if think is None or solution is None:
        raise ValueError("assistant turn lacks <|begin_of_thought|> or <|begin_of_solution|>")
    return Record(id=str(row.get("id", index)), messages=user_messages(user, style=style), answer=None,
                  target_think=think, target_answer=solution)


def _openthoughts_metadata(row, index, style):
    return Record(id=str(row.get("id", index)), messages=user_messages(_require_str(row, "problem"), style=style),
                  answer=row.get("ground_truth_solution") or None,
                  target_think=_require_str(row, "deepseek_reasoning").strip(),
                  target_answer=_require_str(row, "deepseek_solution").strip(), meta={"domain": row.get("domain")})


def _orz_math(row, index, style):
    if not isinstance(row, (list, tuple)) or len(row) < 2:
        raise ValueError("expected a [human turn, assistant turn] pair")
    question = _require_str(row[0], "value")
    answer = row[1]["ground_truth"]["value"]
    if not isinstance(answer, str):
        raise TypeError(f"ground_truth.value must be a string, got {type(answer).__name__}")
    return Record(id=str(index), messages=user_messages(question, style=style), answer=answer)


def _orz_eval(row, index, style):
    turns = row["prompt"]
    if not isinstance(turns, list) or not turns:
        raise ValueError("empty conversation")
    question = _require_str(turns[0], "value")
    options = row.get("choices") or None
    answer = _require_str(row, "final_answer")
    return Record(id=str(row.get("id", index)), messages=user_messages(question, options, style), answer=answer,
                  kind="choice" if options else "math", options=options)


def _medqa(row, index, style):
    options = row["options"]
    if not isinstance(options, dict) or not options:
        raise ValueError("field 'options' must be a non-empty {letter: text} mapping")
    answer = _require_str(row, "answer_idx").strip()
    if answer not in options:
        raise ValueError(f"answer_idx {answer!r} is not one of the options {sorted(options)}")
    question = _require_str(row, "question")
    return Record(id=str(row.get("id", index)), messages=user_messages(question, options, style), answer=answer,
                  kind="choice", options=options)


def _mmlu_pro(row, index, style):
    raw = row["options"]
    if isinstance(raw, str):
        raw = ast.literal_eval(raw)
    options = {LETTERS[i]: str(text) for i, text in enumerate(raw)}
    answer = _require_str(row, "answer").strip()
    if answer not in options:
        raise ValueError(f"answer {answer!r} is not one of the options {sorted(options)}")
    question = _require_str(row, "question")
    return Record(id=str(row.get("question_id", index)), messages=user_messages(question, options, style),
                  answer=answer, kind="choice", options=options, meta={"category": row.get("category")})


def _gsm8k(row, index, style):
    solution = _require_str(row, "answer")
    if "####" not in solution:
        raise ValueError("field 'answer' has no '#### <number>' line")
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return Record(id=str(index), messages=user_messages(_require_str(row, "question"), style=style), answer=answer)


def _math500(row, index, style):
    return Record(id=str(row.get("unique_id", index)), messages=user_messages(_require_str(row, "problem"), style=style),
                  answer=_require_str(row, "answer"), meta={"subject": row.get("subject"), "level": row.get("level")})


def _records(row, index, style):
    for key in ("id", "messages"):
        if key not in row:
            raise KeyError(key)
    if not row["messages"]:
        raise ValueError("empty conversation")
    if row.get("answer") is not None and not isinstance(row["answer"], str):
        raise TypeError(f"field 'answer' must be a string, got {type(row['answer']).__name__}")
    return Record.from_json(row)


CONVERTERS = {
    "openthoughts": _openthoughts,
    "openthoughts_metadata": _openthoughts_metadata,
    "orz_math": _orz_math,
    "orz_eval": _orz_eval,
    "medqa": _medqa,
    "mmlu_pro": _mmlu_pro,
    "mmlu_pro_health": _mmlu_pro,
    "gsm8k": _gsm8k,
    "math500": _math500,
    "records": _records,
}
DATA_FORMATS = tuple(CONVERTERS)


def detect_format(row) -> str | None:
    """The format of a row, from its fields (None if unknown)."""
    if isinstance(row, (list, tuple)):
        return "orz_math"
    if not isinstance(row, dict):
        return None
    keys = set(row)
    rules = [
        ({"messages", "id"}, "records"),
        ({"conversations"}, "openthoughts"),
        ({"problem", "deepseek_reasoning"}, "openthoughts_metadata"),
        ({"prompt", "final_answer"}, "orz_eval"),
        ({"question", "options", "answer_idx"}, "medqa"),
        ({"question", "options", "answer_index"}, "mmlu_pro"),
        ({"problem", "answer", "unique_id"}, "math500"),
        ({"question", "answer"}, "gsm8k"),
    ]
    return next((fmt for required, fmt in rules if required <= keys), None)


def add_data_arguments(parser, what: str) -> None:
    """--data, --data-format and --data-split, the same in every stage that reads a data set."""
    parser.add_argument("--data", required=True, help=f"{what}: a JSON/JSONL/Parquet file, a source name or a hub id")
    parser.add_argument("--data-format", choices=DATA_FORMATS, help="override the format recognised from the fields")
    parser.add_argument("--data-split", help="hub split (default: the source's training split)")


# --- reading rows ---------------------------------------------------------------------------------

def is_file_spec(data: str) -> bool:
    return os.path.exists(data) or data.lower().endswith(FILE_SUFFIXES) or "://" in data


def read_rows(path: str) -> list:
    """Rows of a local (or fsspec URL) file: a JSON list, a JSON object of rows keyed by id, JSONL or
    Parquet."""
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    import fsspec
    try:
        with fsspec.open(path, "r", encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
    if stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSONL, read below
        if isinstance(whole, dict) and whole and all(isinstance(v, dict) for v in whole.values()):
            return list(whole.values())  # one object of rows keyed by id (MathVista's testmini.json)
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {line_no} is not valid JSON ({exc.msg})") from None
    return rows


def hub_rows(hub_id: str, config: str | None, split: str, instead: str):
    """A hub data set's split; where the hub cannot give it (no network, no such id), one line that names it
    and says what to give instead."""
    import datasets
    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except (OSError, ValueError) as exc:  # ConnectionError and DatasetNotFoundError are OSErrors
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise DataError(f"cannot load {hub_id} from the hub ({type(exc).__name__}: {reason}); {instead}") from None


def convert_each(rows, convert, origin: str, what: str, bad_rows: list | None = None) -> list[Record]:
    """convert(row, index) for every row. A bad row raises DataError naming `origin`, the row and `what`
    is being read, or, when a `bad_rows` list is given, is skipped and its message appended there."""
    records = []
    for index, row in enumerate(rows):
        try:
            try:
                records.append(convert(row, index))
            except KeyError as exc:
                raise DataError(f"{origin}: row {index}: missing field {exc.args[0]!r} ({what})") from None
            except (TypeError, ValueError, SyntaxError, AttributeError, OSError) as exc:
                raise DataError(f"{origin}: row {index}: {exc} ({what})") from None
        except DataError as exc:
            if bad_rows is None:
                raise
            bad_rows.append(str(exc))
    return records


def convert_rows(rows, fmt: str, origin: str, style: str = "train", bad_rows: list | None = None) -> list[Record]:
    """Convert rows of one format (see convert_each for bad rows)."""
    converter = CONVERTERS[fmt]
    return convert_each(rows, lambda row, index: converter(row, index, style), origin, f"format {fmt}", bad_rows)


def load_records(data: str, data_format: str | None = None, split: str | None = None,
                 style: str = "train", limit: int | None = None, bad_rows: list | None = None) -> list[Record]:
    """Records from a file/URL, a source name in SOURCES, or a hub id.

    style: "train" (the paper's training prompt) or "eval" (its multiple-choice / math prompts).
    bad_rows: collect bad rows' messages here and skip them, instead of raising on the first.
    """
    if data_format is not None and data_format not in CONVERTERS:
        raise DataError(f"unknown data format {data_format!r}; known: {', '.join(DATA_FORMATS)}")
    if is_file_spec(data):
        rows = read_rows(data)
        if not isinstance(rows, list):
            raise DataError(f"{data}: expected a list of rows")
        if not rows:
            raise DataError(f"{data}: no rows")
        fmt = data_format or detect_format(rows[0])
        if fmt is None:
            raise DataError(f"{data}: row 0: cannot recognise the format from its fields "
                            f"{sorted(rows[0]) if isinstance(rows[0], dict) else type(rows[0]).__name__}; "
                            f"pass --data-format (one of {', '.join(DATA_FORMATS)})")
    else:
        if data in SOURCES:
            hub_id, config, default_split = SOURCES[data]
            if hub_id is None:
                raise DataError(f"{data}: this source has no hub id; pass the path or URL of its JSON file")
            fmt = data_format or data
        else:
            hub_id, config, default_split = data, None, "train"
            fmt = data_format
        rows = hub_rows(hub_id, config, split or default_split,
                        "give --data a local file in its fields instead (JSON, JSONL or Parquet)")
        if fmt is None:
            fmt = detect_format(rows[0]) if len(rows) else None
            if fmt is None:
                raise DataError(f"{data}: cannot recognise the format of the hub rows; pass --data-format")
    if fmt == "mmlu_pro_health":
        rows = [row for row in rows if isinstance(row, dict) and row.get("category") == "health"]
    if limit is not None:
        rows = rows[:limit] if isinstance(rows, list) else rows.select(range(min(limit, len(rows))))
    records = convert_rows(rows, fmt, data, style, bad_rows)
    if fmt == "records" and is_file_spec(data) and "://" not in data:
        resolve_image_paths(records, os.path.dirname(os.path.abspath(data)), data)
    return records


def resolve_image_paths(records: list[Record], base_dir: str, origin: str) -> None:
    """Make the image paths in records' messages absolute (relative ones are relative to base_dir, the
    data file's folder) and check that each exists. Images stay on disk until a stage reads them."""
    for record in records:
        for message in record.messages:
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part.get("type") == "image" and isinstance(part.get("image"), str):
                    path = os.path.join(base_dir, part["image"])
                    if not os.path.exists(path):
                        raise DataError(f"{origin}: record {record.id}: image not found: {path}")
                    part["image"] = path


def write_records(path: str, records: list[Record]) -> None:
    """Write records as JSONL atomically (a crash never leaves a half-written file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
