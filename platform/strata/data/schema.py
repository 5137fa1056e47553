"""The public dataset schema (docs/ARCHITECTURE.md, "Data"): reading, validating and atomically writing Parquet.

A dataset is one Parquet file or a directory of `*.parquet` shards read in name order, with the
columns id, image, prompt, answer and split, and optionally `history`: a multi-turn row's earlier
(question, answer) turns. `read_table` gives every table that column, empty where absent. Validation never raises on bad data; it collects
every problem into a `ValidationReport` so one run shows the user everything to fix.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=True),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)
# Earlier turns of a conversation, oldest first; the image (if any) belongs to the first one.
HISTORY = pa.list_(pa.struct([pa.field("question", pa.string()), pa.field("answer", pa.string())]))
SPLITS = ("train", "val", "test")
IMAGE_FORMATS = ("PNG", "JPEG")
DEFAULT_MAX_IMAGE_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset; `row` is None for a whole-dataset problem."""

    row: int | None
    id: str | None
    field: str
    reason: str

    def format(self) -> str:
        """One human-readable line naming the row, id, field and reason."""
        if self.row is None:
            return f"dataset: {self.field}: {self.reason}"
        return f"row {self.row} (id {self.id!r}): {self.field}: {self.reason}"


@dataclass(frozen=True)
class ValidationReport:
    """Every problem found in one dataset."""

    path: str
    num_rows: int
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def format(self, limit: int = 50) -> str:
        """A human-readable report listing at most `limit` problems."""
        if self.ok:
            return f"dataset {self.path}: {self.num_rows} rows, OK"
        lines = [f"dataset {self.path}: {self.num_rows} rows, {len(self.problems)} problem(s)"]
        lines += [f"  {p.format()}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more problem(s) not shown")
        return "\n".join(lines)


class DatasetError(ValueError):
    """A dataset failed validation; `.report` holds the full report."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.format())
        self.report = report


def _dataset_error(path: str, field: str, reason: str) -> DatasetError:
    return DatasetError(ValidationReport(path, 0, (Problem(None, None, field, reason),)))


def read_table(path: str | os.PathLike[str]) -> pa.Table:
    """Read one Parquet file, or every `*.parquet` shard of a directory in name order."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset not found: {p}")
    shards = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    if not shards:
        raise _dataset_error(str(p), "path", "directory holds no *.parquet shards")
    tables = []
    for shard in shards:
        try:
            # Read each shard on its own so a directory name like `split=train` is never
            # mistaken for a hive partition column.
            tables.append(pq.read_table(shard, partitioning=None))
        except (pa.ArrowException, OSError) as e:
            raise _dataset_error(str(p), "path", f"cannot read Parquet file {shard.name}: {e}")
    try:
        return with_history(pa.concat_tables([with_history(t) for t in tables]))
    except pa.ArrowInvalid as e:
        raise _dataset_error(str(p), "path", f"shards have different schemas: {e}")


def with_history(table: pa.Table) -> pa.Table:
    """`table` with a `history` column: empty turns where it has none, so every table concatenates."""
    if "history" in table.column_names:
        return table
    return table.append_column(pa.field("history", HISTORY), pa.array([[]] * table.num_rows, HISTORY))


def turns(history: list[dict] | None) -> list[tuple[str, str]]:
    """A row's `history` value as (question, answer) pairs."""
    return [(t["question"], t["answer"]) for t in history or []]


def _type_ok(name: str, dtype: pa.DataType) -> bool:
    if name == "image":
        # An all-null image column (a text-only dataset) is typed null by pyarrow.
        return pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or dtype == pa.null()
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def image_problem(data: bytes, max_image_bytes: int, max_pixels: int) -> str | None:
    """Why these image bytes are unacceptable, or None when they decode within the limits."""
    if len(data) > max_image_bytes:
        return f"image is {len(data)} bytes, over the limit of {max_image_bytes}"
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; treat it as fatal.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                # `open` reads only the header, so the size is known before any pixel is decoded.
                width, height = img.size
                if width * height > max_pixels:
                    return (
                        f"image is {width}x{height} = {width * height} pixels, over the limit of "
                        f"{max_pixels} (possible decompression bomb)"
                    )
                img.load()  # a full decode is the only way to catch truncated files
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"decompression bomb: {e}"
    except UnidentifiedImageError:
        return f"cannot decode image as {' or '.join(IMAGE_FORMATS)}"
    except Exception as e:  # noqa: BLE001 - any decoder failure is a data problem, not a crash
        return f"cannot decode image: {type(e).__name__}: {e}"
    return None


def _text_problem(value: str | None) -> str | None:
    if value is None:
        return "is null"
    if not value.strip():
        return "is empty or whitespace-only"
    return None


def _history_problems(values: list, add: Callable[[int, str, str], None]) -> None:
    """Report every turn with an empty question or answer."""
    for row, value in enumerate(values):
        for k, turn in enumerate(value or []):
            for key in ("question", "answer"):
                reason = _text_problem(turn and turn[key])
                if reason is not None:
                    add(row, "history", f"history[{k}].{key} {reason}")


def validate_table(
    table: pa.Table,
    path: str = "<table>",
    *,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ValidationReport:
    """Check a table against SCHEMA and the row rules, collecting every problem found."""
    problems: list[Problem] = []
    usable: dict[str, list] = {}
    for field in SCHEMA:
        if field.name not in table.column_names:
            problems.append(Problem(None, None, field.name, "missing column"))
        elif not _type_ok(field.name, table.schema.field(field.name).type):
            got = table.schema.field(field.name).type
            reason = f"mistyped column: expected {field.type}, got {got}"
            problems.append(Problem(None, None, field.name, reason))
        else:
            usable[field.name] = table.column(field.name).to_pylist()
    if "history" in table.column_names:
        got = table.schema.field("history").type
        if got.equals(HISTORY) or got == pa.list_(pa.null()):
            usable["history"] = table.column("history").to_pylist()
        else:
            problems.append(Problem(None, None, "history", f"mistyped column: expected {HISTORY}, got {got}"))

    n = table.num_rows
    ids: list[str | None] = usable.get("id", [None] * n)
    # Row problems are grouped by row so the report reads top to bottom.
    by_row: list[list[Problem]] = [[] for _ in range(n)]

    def add(row: int, field: str, reason: str) -> None:
        by_row[row].append(Problem(row, ids[row], field, reason))

    if "id" in usable:
        first_row: dict[str, int] = {}
        for row, value in enumerate(ids):
            if value is None or not value.strip():
                add(row, "id", "id is null or empty")
            elif value in first_row:
                other = first_row[value]
                add(row, "id", f"duplicate id {value!r}: also used by row {other}")
            else:
                first_row[value] = row

    image_hashes: list[str | None] = [None] * n
    if "image" in usable:
        for row, data in enumerate(usable["image"]):
            if data is None:
                continue  # a text-only row
            image_hashes[row] = hashlib.sha256(data).hexdigest()
            reason = image_problem(data, max_image_bytes, max_pixels)
            if reason is not None:
                add(row, "image", reason)

    if "history" in usable:
        _history_problems(usable["history"], add)

    for name in ("prompt", "answer"):
        if name in usable:
            for row, value in enumerate(usable[name]):
                reason = _text_problem(value)
                if reason is not None:
                    add(row, name, f"{name} {reason}")

    if "split" in usable:
        for row, value in enumerate(usable["split"]):
            if value not in SPLITS:
                add(row, "split", f"split {value!r} is not one of {', '.join(SPLITS)}")

    if "prompt" in usable and "split" in usable:
        # A test row identical (conversation + image) to a train row measures memory, not skill.
        history = [str(h or []) for h in usable.get("history", [None] * n)]
        train_rows: dict[tuple[str, str, str | None], int] = {}
        for row, (split, prompt) in enumerate(zip(usable["split"], usable["prompt"])):
            if split == "train" and prompt is not None:
                train_rows.setdefault((prompt, history[row], image_hashes[row]), row)
        for row, (split, prompt) in enumerate(zip(usable["split"], usable["prompt"])):
            if split != "test" or prompt is None:
                continue
            other = train_rows.get((prompt, history[row], image_hashes[row]))
            if other is not None:
                add(
                    row,
                    "prompt+image",
                    f"train/test overlap: same prompt and image as train row {other} "
                    f"(id {ids[other]!r})",
                )

    problems += [p for row_problems in by_row for p in row_problems]
    return ValidationReport(path=path, num_rows=n, problems=tuple(problems))


def validate_dataset(path: str | os.PathLike[str], **limits: int) -> ValidationReport:
    """Read a dataset from disk and validate it; unreadable files become a report, not a crash."""
    try:
        table = read_table(path)
    except DatasetError as e:
        return e.report
    return validate_table(table, str(path), **limits)


def load_dataset(path: str | os.PathLike[str], **limits: int) -> pa.Table:
    """Read and validate a dataset; raise DatasetError unless it is valid. Never writes."""
    table = read_table(path)
    report = validate_table(table, str(path), **limits)
    if not report.ok:
        raise DatasetError(report)
    return table


def write_table(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write one Parquet file atomically: a temp file in the same directory, then os.replace."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so os.replace is a rename on one filesystem and readers never see half a file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
