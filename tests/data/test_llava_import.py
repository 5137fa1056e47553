"""LLaVA conversation JSON import: one row per assistant turn, safe paths, clear errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from strata.data.llava_import import LlavaFormatError, import_llava
from strata.data.schema import DatasetError, read_table, validate_dataset


def write_png(path: Path, colour: tuple[int, int, int]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def conversation(*texts: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


def write_json(path: Path, records: object) -> Path:
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for i in range(40):
        write_png(root / "coco" / f"{i}.png", (i * 6, 100, 200 - i))
    return root


def test_multi_turn_becomes_one_row_per_answer(tmp_path: Path, images: Path) -> None:
    records = [
        {
            "id": "conv1",
            "image": "coco/0.png",
            "conversations": conversation(
                "<image>\nWhat is in the picture?", "A square.", "What colour is it?", "Blue."
            ),
        },
        {"id": 7, "conversations": conversation("Say hello.", "Hello.")},  # text-only
    ]
    out = tmp_path / "out" / "data.parquet"
    summary = import_llava(write_json(tmp_path / "d.json", records), images, out)
    assert (summary.records, summary.rows, summary.skipped) == (2, 3, ())
    assert summary.rows_per_split == {"train": 3, "val": 0, "test": 0}
    rows = read_table(out).to_pylist()
    assert [r["id"] for r in rows] == ["conv1-t0", "conv1-t1", "7-t0"]
    assert rows[0]["prompt"] == "What is in the picture?"
    assert rows[1]["prompt"] == "What colour is it?"
    assert rows[1]["history"] == [{"question": "What is in the picture?", "answer": "A square."}]
    assert rows[0]["history"] == rows[2]["history"] == []
    assert [r["answer"] for r in rows] == ["A square.", "Blue.", "Hello."]
    assert rows[0]["image"] == rows[1]["image"] == (images / "coco" / "0.png").read_bytes()
    assert rows[2]["image"] is None
    assert validate_dataset(out).ok


def test_split_fractions_keep_conversations_together(tmp_path: Path, images: Path) -> None:
    records = [
        {"id": f"c{i}", "image": f"coco/{i}.png",
         "conversations": conversation(f"<image> Q{i}a", "A", f"Q{i}b", "B")}
        for i in range(40)
    ]  # fmt: skip
    path = write_json(tmp_path / "d.json", records)
    kwargs = {"val_fraction": 0.2, "test_fraction": 0.3, "seed": 3}
    summary = import_llava(path, images, tmp_path / "a.parquet", **kwargs)
    rows = read_table(tmp_path / "a.parquet").to_pylist()
    by_record: dict[str, set[str]] = {}
    for r in rows:
        by_record.setdefault(r["id"].rsplit("-t", 1)[0], set()).add(r["split"])
    assert all(len(splits) == 1 for splits in by_record.values())
    assert all(summary.rows_per_split[s] > 0 for s in ("train", "val", "test"))
    import_llava(path, images, tmp_path / "b.parquet", **kwargs)
    assert read_table(tmp_path / "b.parquet").equals(read_table(tmp_path / "a.parquet"))


@pytest.mark.parametrize("bad_path", ["../secret.png", "/etc/passwd", "coco/../../secret.png"])
def test_path_traversal_is_refused(tmp_path: Path, images: Path, bad_path: str) -> None:
    write_png(tmp_path / "secret.png", (1, 2, 3))
    records = [
        {"id": "ok", "image": "coco/1.png", "conversations": conversation("Q", "A")},
        {"id": "evil", "image": bad_path, "conversations": conversation("Q", "A")},
    ]
    out = tmp_path / "out.parquet"
    expected = r"record 1 \(id 'evil'\).*escapes the image directory"
    with pytest.raises(LlavaFormatError, match=expected):
        import_llava(write_json(tmp_path / "d.json", records), images, out)
    assert not out.exists()


def test_symlink_out_of_image_dir_is_refused(tmp_path: Path, images: Path) -> None:
    write_png(tmp_path / "secret.png", (1, 2, 3))
    (images / "link.png").symlink_to(tmp_path / "secret.png")
    records = [{"id": "x", "image": "link.png", "conversations": conversation("Q", "A")}]
    with pytest.raises(LlavaFormatError, match="escapes"):
        import_llava(write_json(tmp_path / "d.json", records), images, tmp_path / "o.parquet")


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"id": "r"}, "'conversations' is missing"),
        ({"id": "r", "conversations": []}, "'conversations' is missing"),
        ({"id": "r", "conversations": conversation("Q", "A")[::-1]}, "turn 0 is from 'gpt'"),
        ({"id": "r", "conversations": conversation("Q", "A", "Q2")}, "unanswered human turn"),
        ({"id": "r", "conversations": [{"from": "human", "value": 3}]}, "string 'value'"),
        ({"conversations": conversation("Q", "A")}, "no 'id'"),
    ],
)
def test_malformed_record_names_the_record(
    tmp_path: Path, images: Path, record: dict, reason: str
) -> None:
    good = {"id": "g", "conversations": conversation("Q", "A")}
    out = tmp_path / "out.parquet"
    with pytest.raises(LlavaFormatError, match=r"record 1 \(id ") as info:
        import_llava(write_json(tmp_path / "d.json", [good, record]), images, out)
    assert reason in str(info.value)
    assert not out.exists()


def test_missing_image_file_is_skipped_and_reported(tmp_path: Path, images: Path) -> None:
    records = [
        {"id": "a", "image": "coco/2.png", "conversations": conversation("Q", "A")},
        {"id": "b", "image": "coco/missing.png", "conversations": conversation("Q", "A")},
    ]
    summary = import_llava(write_json(tmp_path / "d.json", records), images, tmp_path / "o.parquet")
    assert summary.rows == 1
    assert [(s.index, s.id) for s in summary.skipped] == [(1, "b")]
    assert "not found" in summary.skipped[0].reason


def test_invalid_rows_raise_dataset_error_and_write_nothing(tmp_path: Path, images: Path) -> None:
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    records = [
        {"id": "a", "image": "broken.jpg", "conversations": conversation("Q", "A")},
        {"id": "b", "conversations": conversation("Q", "   ")},
    ]
    out = tmp_path / "o.parquet"
    with pytest.raises(DatasetError) as info:
        import_llava(write_json(tmp_path / "d.json", records), images, out)
    message = str(info.value)
    assert "row 0 (id 'a-t0'): image" in message and "row 1 (id 'b-t0'): answer" in message
    assert not out.exists()


def test_bad_arguments_and_top_level(tmp_path: Path, images: Path) -> None:
    path = write_json(tmp_path / "d.json", {"not": "a list"})
    with pytest.raises(LlavaFormatError, match="JSON list"):
        import_llava(path, images, tmp_path / "o.parquet")
    with pytest.raises(ValueError, match="split must be"):
        import_llava(path, images, tmp_path / "o.parquet", split="dev")
    with pytest.raises(ValueError, match="sum <= 1"):
        import_llava(path, images, tmp_path / "o.parquet", val_fraction=0.6, test_fraction=0.6)
