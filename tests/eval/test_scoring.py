"""Scorers: normalisation, exact match, ROUGE-L and the per-task choice between them."""

from __future__ import annotations

import pytest

from strata.eval import scoring as s


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  The Cat  ", "cat"),
        ("A dog, an apple, the end.", "dog apple end"),
        ("Yes!</s> trailing garbage</s>", "yes"),
        ("</s>anything", ""),
        ("two\n\twords", "two words"),
        ("“Quoted”—dash", "quoteddash"),
        ("theater anthem", "theater anthem"),  # articles only as whole words
        ("don't", "dont"),
    ],
)
def test_normalize(text, expected):
    assert s.normalize(text) == expected


def test_exact_match():
    assert s.exact_match("The red car.", "red car") == 1.0
    assert s.exact_match("Red car</s>ignored", "red car") == 1.0
    assert s.exact_match("blue car", "red car") == 0.0


def test_rouge_l():
    assert s.rouge_l("a man riding a horse", "a man riding a horse") == pytest.approx(1.0)
    assert s.rouge_l("cat sat on mat", "dogs run fast") == pytest.approx(0.0)
    # Cut at EOS before scoring: the tail must not dilute precision.
    assert s.rouge_l("a man riding a horse</s> extra words", "a man riding a horse") == (
        pytest.approx(1.0)
    )
    partial = s.rouge_l("a man riding", "a man riding a horse")
    assert 0.0 < partial < 1.0


def test_scorer_for():
    assert s.scorer_for(["yes", "no", "The red car"]) == "exact_match"  # 'red car' is 2 words
    assert s.scorer_for(["one two three"]) == "exact_match"
    assert s.scorer_for(["yes", "a man riding a brown horse"]) == "rouge_l"
    with pytest.raises(ValueError):
        s.scorer_for([])


def test_score():
    assert s.score(["Yes", "no"], ["yes", "yes"], "exact_match") == [1.0, 0.0]
    out = s.score(["a b c", "x"], ["a b c", "y"], "rouge_l")
    assert out == [pytest.approx(1.0), pytest.approx(0.0)]
    with pytest.raises(ValueError, match="'bleu'"):
        s.score(["a"], ["a"], "bleu")
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        s.score(["a"], ["a", "b"], "exact_match")


def test_version_is_a_string():
    assert isinstance(s.SCORER_VERSION, str) and s.SCORER_VERSION
