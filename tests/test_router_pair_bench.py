"""benchmarks/router_pair.py: the one-word task pair shares its images, and the confusion matrix counts routes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow as pa

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "router_pair.py"


def load():
    spec = importlib.util.spec_from_file_location("router_pair", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pair_shares_images_differs_by_one_word_and_flips_answers() -> None:
    pair = load().pair_tables(seed=0, n_train=12, n_val=4, n_test=4)
    there, negated = pair["there"].to_pylist(), pair["not"].to_pylist()
    assert len(there) == len(negated) == 20
    for a, b in zip(there, negated):
        assert a["image"] == b["image"] and a["split"] == b["split"]
        words_a, words_b = a["prompt"].split(), b["prompt"].split()
        assert [w for w in words_b if w != "not"] == words_a and len(words_b) == len(words_a) + 1
        assert {a["answer"], b["answer"]} == {"yes", "no"}
    assert {r["answer"] for r in there} == {"yes", "no"}


def test_confusion_counts_the_last_tasks_routes() -> None:
    bench = load()
    rows = [("there", "there", "there"), ("not", "there", "there"), ("not", "there", "there"),
            ("not", "not", "not"), ("not", "not", "there")]
    table = pa.Table.from_pylist([{"after_task": a, "task": t, "adapter": r} for a, t, r in rows])
    matrix = bench.confusion(table)
    assert matrix == {"there": {"there": 2}, "not": {"not": 1, "there": 1}}  # the first row is from task 1
    assert bench.accuracy(matrix) == 75.0
