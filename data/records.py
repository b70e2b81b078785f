"""The one record type every stage reads, and its JSONL form."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field


class DataError(ValueError):
    """Bad input data; the message names the file (or hub id) and the row."""


def run_script(main) -> None:
    """A script's entry point: bad input data ends in one line naming the file and the row, not a
    traceback (a traceback points at this project's code, where nothing is to be fixed)."""
    try:
        main()
    except DataError as exc:
        raise SystemExit(f"error: {exc}") from None


@dataclass
class Record:
    """One question, ready for any stage.

    messages: the chat sent to the model (user content is a string, or a list of
        {"type": "text", "text": ...} / {"type": "image", "image": path-or-PIL} parts).
    answer: the gold answer (an option letter when kind == "choice").
    kind: "math" (graded by math equivalence) or "choice" (graded by option letter).
    options: letter -> option text, for choice items.
    target_think / target_answer: the SFT target (the assistant's thinking and final answer).
    meta: anything else worth keeping (source category, teacher name, ...).
    """

    id: str
    messages: list[dict]
    answer: str | None
    kind: str = "math"
    options: dict[str, str] | None = None
    target_think: str | None = None
    target_answer: str | None = None
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, row: dict) -> "Record":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})


def write_jsonl_line(fh, obj: dict) -> None:
    """Append one JSON line and flush, so an interrupted run loses at most the line in flight."""
    fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
    fh.flush()


def open_for_append(path: str):
    """Open a JSONL file to append to, first cutting off a last line left unfinished by a crash (which
    the next line would otherwise be glued to)."""
    if os.path.exists(path):
        with open(path, "rb+") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                fh.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")
