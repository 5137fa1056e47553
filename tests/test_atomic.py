"""Atomic writes: the result replaces what was there, and no temp file or dir is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata.atomic import replace_dir, write_file, write_text


def test_write_text_creates_parents_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "metrics.json"
    assert write_text(path, "one") == path
    assert path.read_text() == "one"
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]


def test_write_text_replaces_existing_content(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("old content that is longer than the new one")
    write_text(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_write_text_failure_keeps_old_file_and_cleans_temp(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_text(path, 123)  # type: ignore[arg-type]  # f.write(int) fails mid-write
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_write_file_failure_after_a_partial_write_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_file(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["w.bin"]
    assert write_file(path, lambda tmp: tmp.write_bytes(b"new")).read_bytes() == b"new"


def make_dir(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_replace_dir_moves_into_place(tmp_path: Path) -> None:
    src = make_dir(tmp_path / "incoming", {"x.json": "1"})
    dest = tmp_path / "adapter"
    assert replace_dir(src, dest) == dest
    assert (dest / "x.json").read_text() == "1"
    assert not src.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_replace_dir_swaps_out_existing_dir_completely(tmp_path: Path) -> None:
    dest = make_dir(tmp_path / "adapter", {"old_only.bin": "old", "shared.json": "old"})
    src = make_dir(tmp_path / "incoming", {"shared.json": "new", "new_only.bin": "new"})
    replace_dir(src, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["new_only.bin", "shared.json"]
    assert (dest / "shared.json").read_text() == "new"
    # Neither the source nor the `.adapter.old` swap directory is left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_replace_dir_ignores_a_stale_old_dir(tmp_path: Path) -> None:
    make_dir(tmp_path / ".adapter.old", {"junk": "x"})  # left by a crash mid-swap
    dest = make_dir(tmp_path / "adapter", {"a": "old"})
    replace_dir(make_dir(tmp_path / "incoming", {"a": "new"}), dest)
    assert (dest / "a").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
