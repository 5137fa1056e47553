"""The built-in benchmark: deterministic, valid, balanced, and its tasks really differ."""

from __future__ import annotations

import inspect
import io
import random
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image, ImageStat

from strata.data import benchmark
from strata.data.benchmark import (
    TASKS,
    generate_task,
    write_benchmark,
)
from strata.data.scenes import COLOURS, LOCATIONS, SHAPES, Obj, Scene, caption, draw, random_scene
from strata.data.schema import HISTORY, SCHEMA, read_table, validate_table

SMALL = {"n_train": 60, "n_val": 12, "n_test": 60}


@pytest.fixture(scope="module")
def tables() -> dict[str, pa.Table]:
    return {task: generate_task(task, seed=1, **SMALL) for task in TASKS}


def rows(table: pa.Table, split: str | None = None) -> list[dict]:
    return [r for r in table.to_pylist() if split is None or r["split"] == split]


def mean_brightness(png: bytes) -> float:
    return ImageStat.Stat(Image.open(io.BytesIO(png)).convert("L")).mean[0]


@pytest.mark.parametrize("task", TASKS)
def test_generated_task_is_valid(task: str, tables: dict[str, pa.Table]) -> None:
    table = tables[task]
    assert table.schema.equals(SCHEMA.append(pa.field("history", HISTORY)))
    assert table["history"].to_pylist() == [[]] * len(table)  # single-turn rows
    report = validate_table(table)
    assert report.ok, report.format()
    splits = Counter(table.column("split").to_pylist())
    assert splits == {"train": 60, "val": 12, "test": 60}
    assert table.column("id")[0].as_py() == f"{task}-000000"


def test_same_seed_gives_identical_bytes() -> None:
    a = generate_task("relation", seed=7, n_train=20, n_val=5, n_test=20)
    b = generate_task("relation", seed=7, n_train=20, n_val=5, n_test=20)
    c = generate_task("relation", seed=8, n_train=20, n_val=5, n_test=20)
    assert a.equals(b)
    assert not a.equals(c)


def test_test_split_does_not_depend_on_train_size() -> None:
    a = rows(generate_task("count", seed=0, n_train=10, n_val=0, n_test=20), "test")
    b = rows(generate_task("count", seed=0, n_train=30, n_val=0, n_test=20), "test")
    assert [(r["image"], r["answer"]) for r in a] == [(r["image"], r["answer"]) for r in b]


def test_defaults_give_at_least_500_test_rows() -> None:
    assert inspect.signature(generate_task).parameters["n_test"].default >= 500
    assert inspect.signature(write_benchmark).parameters["n_test"].default >= 500
    table = generate_task("shape", seed=0)
    assert table.column("split").to_pylist().count("test") >= 500


def template(prompt: str) -> str:
    """The prompt with colour and shape names masked, i.e. the task's wording."""
    return re.sub(rf"\b({'|'.join(list(COLOURS) + list(SHAPES))})\b", "_", prompt)


def test_each_task_is_asked_in_several_wordings_of_its_own(tables: dict[str, pa.Table]) -> None:
    wordings = {task: {template(r["prompt"]) for r in rows(tables[task])} for task in TASKS}
    for task in TASKS:
        assert len(wordings[task]) >= 3, (task, wordings[task])
    assert sum(len(ws) for ws in wordings.values()) == len({w for ws in wordings.values() for w in ws})


def test_answer_formats_conflict_between_tasks(tables: dict[str, pa.Table]) -> None:
    answers = {task: set(tables[task].column("answer").to_pylist()) for task in TASKS}
    assert answers["count"] <= {"1", "2", "3", "4", "5"}
    assert answers["exists"] == {"yes", "no"}
    assert answers["relation"] == {"left", "right", "above", "below"}
    assert answers["location"] <= set(LOCATIONS)
    assert answers["colour"] == answers["shift"] == set(COLOURS)
    assert answers["shape"] == set(SHAPES)
    assert all(len(a.split()) == 2 for a in answers["size"])


@pytest.mark.parametrize("task", ["colour", "shape", "count", "location", "exists", "relation"])
def test_answers_are_balanced(task: str, tables: dict[str, pa.Table]) -> None:
    for split in ("train", "test"):
        counts = Counter(r["answer"] for r in rows(tables[task], split))
        assert max(counts.values()) - min(counts.values()) <= 1, counts


def names(task: str, prompt: str) -> dict[str, str]:
    """The colour and shape names a prompt was filled with, by matching it against the task's paraphrases."""
    for paraphrase in benchmark.PROMPTS[task]:
        pattern = re.escape(paraphrase)
        for field in ("colour", "shape", "c1", "s1", "c2", "s2"):
            pattern = pattern.replace(re.escape("{" + field + "}"), f"(?P<{field}>\\w+)")
        found = re.fullmatch(pattern, prompt)
        if found:
            return found.groupdict()
    raise AssertionError(f"{task}: {prompt!r} matches none of its paraphrases")


def test_size_answer_position_is_balanced(tables: dict[str, pa.Table]) -> None:
    first = 0
    test_rows = rows(tables["size"], "test")
    for r in test_rows:
        found = names("size", r["prompt"])
        c1, s1 = found["c1"], found["s1"]
        first += r["answer"] == f"{c1} {s1}"
        assert r["answer"] in r["prompt"]
    assert first == len(test_rows) // 2


def test_builders_answer_correctly() -> None:
    rng = random.Random(0)
    builders = {task: spec for task, spec in benchmark._TASK_SPECS.items()}
    for _ in range(200):
        for task in ("count", "exists", "relation", "size"):
            build, choices = builders[task]
            scene, prompt, answer = build(rng, rng.choice(list(choices)))
            objs = scene.objects
            if task == "count":
                assert answer == str(len(objs))
            elif task == "exists":
                colour, shape = (names("exists", prompt)[k] for k in ("colour", "shape"))
                present = any(o.colour == colour and o.shape == shape for o in objs)
                assert answer == ("yes" if present else "no")
                if not present:  # a near miss, not a trivially absent colour and shape
                    assert any(o.colour == colour or o.shape == shape for o in objs)
            elif task == "relation":
                c1, s1, c2, s2 = (names("relation", prompt)[k] for k in ("c1", "s1", "c2", "s2"))
                a = next(o for o in objs if (o.colour, o.shape) == (c1, s1))
                b = next(o for o in objs if (o.colour, o.shape) == (c2, s2))
                assert (c1, s1) != (c2, s2)
                expected = (
                    ("left" if a.col < b.col else "right") if a.col != b.col
                    else ("above" if a.row < b.row else "below")
                )  # fmt: skip
                assert answer == expected
            else:
                large = next(o for o in objs if o.size == "large")
                assert answer == large.kind and {o.size for o in objs} == {"small", "large"}


def test_shift_domain_differs_in_pixel_statistics(tables: dict[str, pa.Table]) -> None:
    default = [mean_brightness(r["image"]) for r in rows(tables["colour"])[:30]]
    shifted = [mean_brightness(r["image"]) for r in rows(tables["shift"])[:30]]
    assert min(default) > 180 and max(shifted) < 90


def test_shift_palette_uses_other_shades() -> None:
    obj = Obj("red", "square", "large", 1, 1)
    centre = {
        domain: draw(Scene((obj,), domain), random.Random(0), 48).getpixel((24, 24))
        for domain in ("default", "shift")
    }
    assert sum(abs(a - b) for a, b in zip(centre["default"], centre["shift"])) > 60


def test_sizes_are_distinguishable() -> None:
    def area(size: str) -> int:
        scene = Scene((Obj("blue", "circle", size, 1, 1),))
        img = draw(scene, random.Random(size), 48).convert("L")
        return sum(1 for v in img.tobytes() if v < 180)

    assert area("large") > 2.5 * area("small")


def test_write_benchmark_skips_matching_files(tmp_path: Path) -> None:
    args = {"tasks": ("colour", "count"), "n_train": 8, "n_val": 2, "n_test": 8}
    paths = write_benchmark(tmp_path, seed=0, **args)
    assert set(paths) == {"colour", "count"}
    assert read_table(paths["colour"]).equals(generate_task("colour", 0, 8, 2, 8))
    mtime = paths["colour"].stat().st_mtime_ns
    write_benchmark(tmp_path, seed=0, **args)
    assert paths["colour"].stat().st_mtime_ns == mtime
    write_benchmark(tmp_path, seed=1, **args)
    assert not read_table(paths["colour"]).equals(generate_task("colour", 0, 8, 2, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "colour.json", "colour.parquet", "count.json", "count.parquet"
    ]  # fmt: skip


def test_caption_lists_objects_row_major() -> None:
    scene = Scene((Obj("blue", "square", "small", 1, 1), Obj("red", "circle", "large", 0, 0)))
    assert caption(scene) == "a large red circle at top left and a small blue square at center."
    scene = random_scene(random.Random(3), 5, distinct_kinds=True)
    assert caption(scene).count(" at ") == 5
