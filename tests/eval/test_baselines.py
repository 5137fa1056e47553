"""The per-task baselines: the constant answer, and a linear model on the raw pixels."""

from __future__ import annotations


from strata.data.benchmark import generate_task
from strata.eval.baselines import constant_answer, pixel_classifier, task_baselines
from strata.eval.report import task_table


def test_the_constant_answer_is_the_majority_train_answer() -> None:
    assert constant_answer(["yes", "Yes.", "no"], ["yes", "no", "no", "yes"]) == 50.0
    assert constant_answer([], ["yes"]) is None


def test_pixels_learn_where_the_object_is_and_free_text_gets_no_classifier() -> None:
    got = task_baselines(generate_task("location", seed=0, n_train=150, n_val=0, n_test=60))
    assert got["constant"] < 20 and got["pixels"] > 80, got  # nine balanced cells; position is linear in pixels
    image = generate_task("colour", seed=0, n_train=1, n_val=0, n_test=0)["image"][0].as_py()
    texts = [f"a long answer number {i}" for i in range(60)]
    assert pixel_classifier([image] * 60, texts, [image], ["a long answer number 1"]) is None


def test_the_task_table_puts_baselines_beside_each_strategy() -> None:
    results = {"seqlora": {"tasks": ["colour", "shape"], "accuracy_matrix": [[90.0, 0.0], [10.0, 80.0]]}}
    table = task_table(results, {"colour": {"constant": 16.7, "pixels": 95.0}, "shape": {"constant": 25.0,
                                                                                        "pixels": None}})
    assert [c.header for c in table.columns] == ["task", "constant", "pixels", "seqlora"]
    assert list(table.columns[3].cells) == ["90.0 → 10.0", "80.0 → 80.0"]
    assert list(table.columns[2].cells) == ["95.0", "—"]
