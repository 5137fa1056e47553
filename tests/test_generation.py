"""strata.generation: per-row budgets and ends of sequence, and tokens handed out as they are decoded."""

from __future__ import annotations

import pytest

from strata.data.benchmark import generate_task
from strata.data.collate import encode_table
from strata.generation import generate


@pytest.fixture(scope="module")
def rows(backbone_dir):
    from strata.backbone.load import load_backbone
    from strata.config import BackboneSpec

    model, processor = load_backbone(BackboneSpec(str(backbone_dir)), backbone_dir)
    enc = encode_table(processor, generate_task("shape", 0, n_train=0, n_val=0, n_test=6), with_answers=False)
    return model, processor, enc


def test_each_row_keeps_its_own_budget_and_the_rest_is_unchanged(rows) -> None:
    model, processor, enc = rows
    long = generate(model, processor, enc, 12)
    budgets = [1, 12, 3, 12, 2, 5]
    short = generate(model, processor, enc, budgets)
    for g, full, b in zip(short, long, budgets):
        assert g.tokens == full.tokens[:b]  # a shorter budget cuts the same greedy answer, nothing else
        assert len(g.tokens) <= b and g.finish_reason in ("stop", "length")
        assert g.finish_reason == "length" or len(g.tokens) < b
    with pytest.raises(ValueError, match="one token budget >= 1 per row"):
        generate(model, processor, enc, [1, 2])


def test_tokens_are_handed_out_row_by_row_as_they_are_decoded(rows) -> None:
    model, processor, enc = rows
    events: list[tuple[int, int]] = []
    out = generate(model, processor, enc, 8, on_token=lambda row, token: events.append((row, token)))
    for row, g in enumerate(out):
        assert [t for r, t in events if r == row] == g.tokens  # every token once, in order, no end of sequence
    first_rows = [r for r, _ in events[: len(enc)]]
    assert sorted(first_rows) == list(range(len(enc)))  # step 1 of every row comes before step 2 of any
