"""Import LLaVA / LLaMA-Factory conversation JSON into the public schema (docs/ARCHITECTURE.md, "Data").

Each assistant ("gpt") turn becomes one row: its question as `prompt`, the turns before it as
`history`. The backbone's own chat template renders the whole conversation, in training as in
serving.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from strata.data.schema import HISTORY, SCHEMA, SPLITS, DatasetError, validate_table, write_table
from strata.data.template import IMAGE_TOKEN

HUMAN = "human"
ASSISTANT = "gpt"
# The placeholder and the whitespace around it, e.g. "<image>\nWhat is this?".
_IMAGE_PLACEHOLDER = re.compile(rf"\s*{re.escape(IMAGE_TOKEN)}\s*")


class LlavaFormatError(ValueError):
    """A record of the LLaVA JSON is malformed or unsafe; the message names the record."""


@dataclass(frozen=True)
class SkippedRecord:
    """A record that was left out, and why."""

    index: int
    id: str | None
    reason: str


@dataclass(frozen=True)
class ImportSummary:
    """What an import wrote."""

    out_path: Path
    records: int
    rows: int
    rows_per_split: dict[str, int]
    skipped: tuple[SkippedRecord, ...] = field(default_factory=tuple)


def _fail(index: int, record_id: str | None, reason: str) -> LlavaFormatError:
    return LlavaFormatError(f"record {index} (id {record_id!r}): {reason}")


def _strip_placeholder(text: str) -> str:
    return _IMAGE_PLACEHOLDER.sub(" ", text).strip()


def _record_split(
    record_id: str, seed: int, split: str, val_fraction: float, test_fraction: float
) -> str:
    """Split by a hash of the record id, so every turn of a conversation lands together."""
    if val_fraction == 0 and test_fraction == 0:
        return split
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _turns(index: int, record_id: str, conversations: Any) -> list[tuple[str, str]]:
    """(question, answer) pairs of a human/gpt alternating conversation, placeholders stripped."""
    if not isinstance(conversations, list) or not conversations:
        raise _fail(index, record_id, "'conversations' is missing, not a list, or empty")
    for t, turn in enumerate(conversations):
        expected = HUMAN if t % 2 == 0 else ASSISTANT
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise _fail(index, record_id, f"turn {t} is not an object with a string 'value'")
        if turn.get("from") != expected:
            raise _fail(
                index,
                record_id,
                f"turn {t} is from {turn.get('from')!r}, expected {expected!r} "
                f"(turns must alternate {HUMAN}/{ASSISTANT}, starting with {HUMAN})",
            )
    if len(conversations) % 2:
        raise _fail(index, record_id, f"conversation ends with an unanswered {HUMAN} turn")
    return [
        (_strip_placeholder(conversations[t]["value"]), conversations[t + 1]["value"].strip())
        for t in range(0, len(conversations), 2)
    ]


def _image_path(index: int, record_id: str, image_dir: Path, relative: Any) -> Path:
    """The image file inside image_dir; anything resolving outside it is refused."""
    if not isinstance(relative, str) or not relative:
        raise _fail(index, record_id, f"'image' must be a non-empty string, got {relative!r}")
    root = image_dir.resolve()
    # resolve() follows symlinks and "..", so both are caught by one containment check.
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise _fail(index, record_id, f"image path {relative!r} escapes the image directory {root}")
    return path


def import_llava(
    json_path: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    split: str = "train",
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> ImportSummary:
    """Convert a LLaVA conversation JSON file to one validated Parquet file, one row per answer.

    Records whose image file is missing are skipped and listed in the summary; malformed or unsafe
    records raise LlavaFormatError, and a table that fails validation raises DatasetError. In
    both error cases nothing is written.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction <= 1):
        raise ValueError(
            f"val_fraction and test_fraction must be in [0, 1] with a sum <= 1, "
            f"got {val_fraction} and {test_fraction}"
        )
    json_path, image_dir = Path(json_path), Path(image_dir)
    try:
        records = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LlavaFormatError(f"{json_path} is not valid JSON: {e}") from e
    if not isinstance(records, list):
        kind = type(records).__name__
        raise LlavaFormatError(f"{json_path} must hold a JSON list of records, got a {kind}")

    columns: dict[str, list] = {name: [] for name in [*SCHEMA.names, "history"]}
    skipped: list[SkippedRecord] = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise _fail(index, None, f"record is a {type(record).__name__}, not an object")
        if not isinstance(record.get("id"), (str, int)) or record["id"] == "":
            raise _fail(index, None, "record has no 'id' (a string or integer)")
        record_id = str(record["id"])
        turns = _turns(index, record_id, record.get("conversations"))
        image: bytes | None = None
        if "image" in record:
            path = _image_path(index, record_id, image_dir, record["image"])
            if not path.is_file():
                skipped.append(SkippedRecord(index, record_id, f"image file not found: {path}"))
                continue
            image = path.read_bytes()
        row_split = _record_split(record_id, seed, split, val_fraction, test_fraction)
        for turn_index, (question, answer) in enumerate(turns):
            columns["id"].append(f"{record_id}-t{turn_index}")
            columns["image"].append(image)
            columns["prompt"].append(question)
            columns["history"].append([{"question": q, "answer": a} for q, a in turns[:turn_index]])
            columns["answer"].append(answer)
            columns["split"].append(row_split)

    table = pa.table(columns, schema=SCHEMA.append(pa.field("history", HISTORY)))
    report = validate_table(table, str(json_path))
    if not report.ok:
        raise DatasetError(report)
    out = write_table(table, out_path)
    per_split = {s: columns["split"].count(s) for s in SPLITS}
    return ImportSummary(out, len(records), table.num_rows, per_split, tuple(skipped))
