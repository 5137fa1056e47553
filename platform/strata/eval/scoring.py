"""Versioned per-task scorers: exact match for short answers, ROUGE-L for long ones (docs/ARCHITECTURE.md, "Metrics").

Scores logged with a run carry SCORER_VERSION, so numbers from different scorer behaviour are
never compared silently.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from functools import lru_cache

from rouge_score import rouge_scorer

from strata.data.template import EOS

# Bump whenever any scorer's output can change for the same input.
SCORER_VERSION = "1"

# A reference longer than this (in normalised words) is scored with ROUGE-L instead of exact match.
MAX_EXACT_MATCH_WORDS = 3

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _cut_at_eos(text: str) -> str:
    """Keep only what the model generated before its first end-of-sequence marker."""
    return text.split(EOS, 1)[0]


def normalize(text: str) -> str:
    """Cut at the first EOS, lowercase, drop punctuation and articles, collapse whitespace."""
    text = _cut_at_eos(text).lower()
    # Unicode category P* covers curly quotes and dashes that string.punctuation misses.
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 if prediction and reference are equal after normalize, else 0.0."""
    return 1.0 if normalize(pred) == normalize(ref) else 0.0


@lru_cache(maxsize=1)
def _rouge() -> rouge_scorer.RougeScorer:
    """One shared scorer; building it per sample is needless work."""
    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure in [0, 1] from the rouge_score library, prediction cut at EOS."""
    # rouge_score tokenises (lowercase, alphanumerics only) itself; only the EOS cut is ours.
    return float(_rouge().score(_cut_at_eos(ref), _cut_at_eos(pred))["rougeL"].fmeasure)


SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "rouge_l": rouge_l,
}


def scorer_for(answers: list[str]) -> str:
    """Pick a task's scorer from its references: exact_match if all are short, else rouge_l."""
    if not answers:
        raise ValueError("scorer_for needs at least one reference answer")
    short = all(len(normalize(a).split()) <= MAX_EXACT_MATCH_WORDS for a in answers)
    return "exact_match" if short else "rouge_l"


def score(preds: Sequence[str], refs: Sequence[str], kind: str) -> list[float]:
    """Per-sample scores in [0, 1] for aligned predictions and references under scorer `kind`."""
    if kind not in SCORERS:
        raise ValueError(f"unknown scorer {kind!r}; expected one of {sorted(SCORERS)}")
    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions but {len(refs)} references")
    fn = SCORERS[kind]
    return [fn(p, r) for p, r in zip(preds, refs)]
