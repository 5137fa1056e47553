"""Dataset schema: every kind of bad row or dataset is reported with its row, field and reason."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from strata.data.schema import (
    HISTORY,
    SCHEMA,
    DatasetError,
    Problem,
    ValidationReport,
    load_dataset,
    read_table,
    validate_dataset,
    validate_table,
    with_history,
    write_table,
)


def png(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG")
    return buf.getvalue()


def truncated_png() -> bytes:
    """A real PNG cut in the middle of its pixel data: the header opens, the decode fails."""
    noise = Image.frombytes("RGB", (32, 32), bytes((i * 97) % 251 for i in range(32 * 32 * 3)))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but has no pixel data: a bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def good_rows() -> dict[str, list]:
    return {
        "id": ["a", "b", "c", "d", "e", "f"],
        "image": [png((255, 0, 0)), png((0, 255, 0)), jpeg((0, 0, 255)), None, png((9, 9, 9)),
                  png((200, 200, 0))],
        "prompt": ["What colour?", "What colour?", "What colour?", "Say hi.", "What colour?",
                   "What colour?"],
        "answer": ["red", "green", "blue", "hi", "black", "yellow"],
        "split": ["train", "train", "val", "train", "test", "test"],
    }  # fmt: skip


def good_table() -> pa.Table:
    return pa.table(good_rows(), schema=SCHEMA)


def with_value(column: str, row: int, value: object) -> Callable[[], pa.Table]:
    def make() -> pa.Table:
        rows = good_rows()
        rows[column][row] = value
        return pa.table(rows, schema=SCHEMA)

    return make


def with_column_added(column: str, values: pa.Array) -> Callable[[], pa.Table]:
    return lambda: good_table().append_column(column, values)


def with_column(column: str, values: pa.Array | None) -> Callable[[], pa.Table]:
    def make() -> pa.Table:
        table = good_table()
        index = table.column_names.index(column)
        if values is None:
            return table.remove_column(index)
        return table.set_column(index, column, values)

    return make


def with_history_of(turns: list) -> Callable[[], pa.Table]:
    """The good table with one multi-turn row (row 1) whose earlier turns are `turns`."""
    def make() -> pa.Table:
        history = [[]] * 6
        history[1] = turns
        return good_table().append_column("history", pa.array(history, HISTORY))

    return make


def overlapping_copy() -> pa.Table:
    rows = good_rows()
    rows["image"][5], rows["prompt"][5] = rows["image"][1], rows["prompt"][1]
    return pa.table(rows, schema=SCHEMA)


# (case, table factory, limits, expected row, expected field, reason substring)
BAD_CASES = [
    ("missing column", with_column("answer", None), {}, None, "answer", "missing column"),
    ("answer is int64", with_column("answer", pa.array([1, 2, 3, 4, 5, 6])), {},
     None, "answer", "mistyped column"),
    ("image is string", with_column("image", pa.array(["x"] * 6)), {},
     None, "image", "mistyped column"),
    ("null id", with_value("id", 2, None), {}, 2, "id", "null or empty"),
    ("empty id", with_value("id", 2, " "), {}, 2, "id", "null or empty"),
    ("duplicate id", with_value("id", 3, "a"), {}, 3, "id", "also used by row 0"),
    ("undecodable image", with_value("image", 1, b"not an image"), {}, 1, "image", "cannot decode"),
    ("truncated png", with_value("image", 1, truncated_png()), {},
     1, "image", "cannot decode"),
    ("gif is not png/jpeg", with_value("image", 1, b"GIF89a" + b"\0" * 20), {},
     1, "image", "cannot decode"),
    ("image over byte limit", good_table, {"max_image_bytes": 20}, 0, "image", "over the limit"),
    ("pixels over limit", good_table, {"max_pixels": 63}, 0, "image", "decompression bomb"),
    # A header claiming 5000x5000 must be refused before any decode (no pixel data exists).
    ("bomb header", with_value("image", 0, png_header_only(5000, 5000)), {},
     0, "image", "possible decompression bomb"),
    # Over twice PIL's own limit: PIL raises DecompressionBombError, which must not crash us.
    ("pil bomb error", with_value("image", 0, png_header_only(20000, 20000)),
     {"max_pixels": 10**12}, 0, "image", "decompression bomb"),
    # Between PIL's limit and twice it, PIL only warns; that too becomes a problem.
    ("pil bomb warning", with_value("image", 0, png_header_only(10000, 10000)),
     {"max_pixels": 10**12}, 0, "image", "decompression bomb"),
    ("null prompt", with_value("prompt", 4, None), {}, 4, "prompt", "null"),
    ("empty prompt", with_value("prompt", 4, ""), {}, 4, "prompt", "empty"),
    ("whitespace answer", with_value("answer", 2, " \n\t"), {}, 2, "answer", "empty"),
    ("null answer", with_value("answer", 2, None), {}, 2, "answer", "null"),
    ("bad split", with_value("split", 1, "training"), {}, 1, "split", "'training' is not one of"),
    ("train/test overlap", overlapping_copy, {}, 5, "prompt+image", "train row 1 (id 'b')"),
    ("empty answer in history", with_history_of([{"question": "What is it?", "answer": " "}]), {},
     1, "history", "history[0].answer is empty"),
    ("null question in history", with_history_of([{"question": "Q", "answer": "A"}, {"question": None, "answer": "B"}]),
     {}, 1, "history", "history[1].question is null"),
    ("history is a string", with_column_added("history", pa.array(["q a"] * 6)), {}, None, "history",
     "mistyped column"),
]  # fmt: skip


@pytest.mark.parametrize(
    "make, limits, row, field, reason",
    [case[1:] for case in BAD_CASES],
    ids=[case[0] for case in BAD_CASES],
)
def test_bad_dataset_is_reported(
    make: Callable[[], pa.Table], limits: dict, row: int | None, field: str, reason: str
) -> None:
    report = validate_table(make(), "bad.parquet", **limits)
    assert not report.ok
    matches = [p for p in report.problems if p.row == row and p.field == field]
    assert matches, report.format()
    assert any(reason in p.reason for p in matches), report.format()
    if row is not None:
        assert matches[0].id == make().column("id")[row].as_py()


def test_good_dataset_passes(tmp_path: Path) -> None:
    report = validate_table(good_table())
    assert report.ok, report.format()
    assert report.num_rows == 6
    path = write_table(good_table(), tmp_path / "nested" / "good.parquet")
    assert validate_dataset(path).ok
    assert load_dataset(path).equals(with_history(good_table()))
    assert load_dataset(path)["history"].to_pylist() == [[]] * 6  # a table without turns gets empty ones
    assert [p.name for p in path.parent.iterdir()] == ["good.parquet"]  # no temp file left behind


def test_all_null_image_column_is_text_only() -> None:
    rows = good_rows()
    rows["image"] = [None] * 6
    rows["prompt"] = [f"q{i}" for i in range(6)]
    assert validate_table(pa.table(rows)).ok  # pyarrow types an all-null column as null


def test_shards_directory_is_read_in_name_order(tmp_path: Path) -> None:
    table = good_table()
    pq.write_table(table.slice(3), tmp_path / "part-1.parquet")
    pq.write_table(table.slice(0, 3), tmp_path / "part-0.parquet")
    (tmp_path / "notes.txt").write_text("not a shard")
    assert read_table(tmp_path).equals(with_history(table))
    assert validate_dataset(tmp_path).ok


def test_history_is_part_of_what_makes_a_test_row_a_copy() -> None:
    table = overlapping_copy().append_column("history", pa.array([[]] * 6, HISTORY))
    assert [p.field for p in validate_table(table).problems] == ["prompt+image"]
    turns = [[]] * 5 + [[{"question": "What is it?", "answer": "A square."}]]
    later_turn = overlapping_copy().append_column("history", pa.array(turns, HISTORY))
    assert validate_table(later_turn).ok  # same image and question, but a different conversation


def test_shard_overlap_across_files_is_caught(tmp_path: Path) -> None:
    table = overlapping_copy()
    pq.write_table(table.slice(0, 3), tmp_path / "a.parquet")
    pq.write_table(table.slice(3), tmp_path / "b.parquet")
    report = validate_dataset(tmp_path)
    assert [(p.row, p.field) for p in report.problems] == [(5, "prompt+image")]


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset not found"):
        read_table(tmp_path / "nope.parquet")
    with pytest.raises(DatasetError, match="no \\*.parquet shards"):
        read_table(tmp_path)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    assert "cannot read Parquet" in validate_dataset(tmp_path).format()


def test_load_dataset_raises_with_row_and_field(tmp_path: Path) -> None:
    path = write_table(with_value("answer", 2, "  ")(), tmp_path / "bad.parquet")
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    message = str(info.value)
    assert "row 2 (id 'c'): answer: answer is empty" in message
    assert not info.value.report.ok


def test_report_format_cuts_long_lists() -> None:
    problems = tuple(Problem(i, f"id{i}", "prompt", "prompt is empty") for i in range(60))
    text = ValidationReport("x.parquet", 60, problems).format(limit=10)
    assert "row 9 (id 'id9')" in text and "row 10 " not in text
    assert "50 more" in text


def test_twenty_thousand_rows_validate_quickly() -> None:
    import time

    images = [png((i % 256, (i // 256) % 256, 7)) for i in range(200)]
    n = 20_000
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "image": [images[i % 200] for i in range(n)],
            "prompt": [f"q{i}" for i in range(n)],
            "answer": ["a"] * n,
            "split": [("train", "val", "test")[i % 3] for i in range(n)],
        },
        schema=SCHEMA,
    )
    start = time.perf_counter()
    assert validate_table(table).ok
    assert time.perf_counter() - start < 10
