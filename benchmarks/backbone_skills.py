"""What a built-in backbone knows before any adapter: its pretraining skills, and which answer words
it can say at all.

    .venv/bin/python benchmarks/backbone_skills.py --backbone builtin:tiny
    .venv/bin/python benchmarks/backbone_skills.py --backbone /path/to/a/built/backbone --rows 50

- **Skills.** Greedy answers on held-out rows of each kind of the pretraining mixture
  (strata/data/pretraining.py), exact sentence match, beside the share of the most common answer
  (what a model that ignores the image gets).
- **Answer words.** For every answer of the 8 built-in tasks: the smallest L2 norm among its
  tokens' embeddings, over the vocabulary's median. The LM head is tied to the embeddings and frozen, so a
  token pretraining never produced stays near the median (ratio ≈ 1, at random init) and no
  adapter can make the model say it (docs/ARCHITECTURE.md, "The built-in backbone").

Writes `benchmarks/results/backbone_skills-<name>.json` and prints two tables.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import time
from pathlib import Path

import pyarrow as pa
import torch
from rich.console import Console
from rich.table import Table

from strata.atomic import write_text
from strata.backbone.load import load_backbone, resolve
from strata.config import BackboneSpec
from strata.data import pretraining
from strata.data.benchmark import TASKS, generate_task
from strata.data.collate import encode_table
from strata.generation import generate

RESULTS = Path(__file__).parent / "results"


def skills(model, processor, rows: int) -> dict[str, dict]:
    """Exact-match accuracy (%) per mixture kind on `rows` held-out rows, and the majority answer's share."""
    rng = random.Random("held-out")  # not the corpus' seed stream: rows the backbone never saw
    out = {}
    for kind, make in pretraining.KINDS.items():
        drawn = [make(rng, 48) for _ in range(rows)]
        table = pa.table({"image": [r[0] for r in drawn], "prompt": [r[1] for r in drawn],
                          "answer": [r[2] for r in drawn]})
        said = generate(model, processor, encode_table(processor, table, with_answers=False), 40)
        answers = [r[2] for r in drawn]
        out[kind] = {"exact": 100.0 * sum(g.text == a for g, a in zip(said, answers)) / rows,
                     "majority": 100.0 * collections.Counter(answers).most_common(1)[0][1] / rows,
                     "example": {"answer": answers[0], "said": said[0].text}}
    return out


def answer_words(model, processor) -> dict[str, dict[str, float]]:
    """Per task and answer: its weakest token's embedding norm over the vocabulary's median norm."""
    norms = model.get_input_embeddings().weight.norm(dim=1)
    median = norms.median().item()
    tok = processor.tokenizer
    out = {}
    for task in TASKS:
        answers = sorted(set(generate_task(task, 0, n_train=60, n_val=0, n_test=0)["answer"].to_pylist()))
        out[task] = {a: norms[tok(" " + a, add_special_tokens=False)["input_ids"]].min().item() / median
                     for a in answers}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="builtin:tiny", help="builtin:tiny, builtin:test or a built directory")
    parser.add_argument("--rows", type=int, default=100, help="held-out rows per mixture kind")
    args = parser.parse_args()
    torch.set_num_threads(2)
    spec = BackboneSpec(args.backbone if args.backbone.startswith("builtin:") else "builtin:tiny")
    path = resolve(spec) if args.backbone.startswith("builtin:") else Path(args.backbone)
    model, processor = load_backbone(spec, path)
    started = time.time()
    report = {"backbone": str(path), "recipe": json.loads((path / "strata_recipe.json").read_text()),
              "skills": skills(model, processor, args.rows), "answer_words": answer_words(model, processor)}
    report["seconds"] = round(time.time() - started, 1)
    console = Console()
    table = Table(title=f"pretraining skills ({args.rows} held-out rows each, exact sentence match %)")
    for col in ("kind", "exact", "majority answer", "example: expected → said"):
        table.add_column(col)
    for kind, s in report["skills"].items():
        table.add_row(kind, f"{s['exact']:.0f}", f"{s['majority']:.0f}",
                      f"{s['example']['answer']} → {s['example']['said']}")
    console.print(table)
    words = Table(title="answer words: weakest token's embedding norm / vocabulary median (≈1: never said)")
    words.add_column("task")
    words.add_column("answers")
    for task, ratios in report["answer_words"].items():
        words.add_row(task, ", ".join(f"{a} {r:.2f}" for a, r in ratios.items()))
    console.print(words)
    name = Path(args.backbone).name.replace("builtin:", "")
    write_text(RESULTS / f"backbone_skills-{name}.json", json.dumps(report, indent=2))
    console.print(f"written {RESULTS / f'backbone_skills-{name}.json'}")


if __name__ == "__main__":
    main()
