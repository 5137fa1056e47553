"""An external dataset, as a new user would bring it: scikit-learn's handwritten digits, through LLaVA JSON.

    .venv/bin/pip install scikit-learn        # not a Strata dependency: only this benchmark needs it
    .venv/bin/python benchmarks/external_digits.py [--out runs/external-digits] [--strategy decoupled]

scikit-learn ships the UCI "Optical Recognition of Handwritten Digits" set (1,797 images of 8×8
pixels, 16 grey levels), so it needs no download. Strata's code drew none of it. This script writes
it as LLaVA conversation JSON with PNG files (upscaled to 32×32, dark ink on white), in three
tasks that share the images:

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
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = "zero one two three four five six seven eight nine".split()
TASKS = {
    "digit": ("Which digit is written here?", lambda d: str(d)),
    "even": ("Is this digit even?", lambda d: "yes" if d % 2 == 0 else "no"),
    "big": ("Is the digit larger than four?", lambda d: "yes" if d > 4 else "no"),
}


def write_llava(out: Path) -> dict[str, Path]:
    """The digits as PNGs plus one LLaVA JSON per task; returns task -> JSON path."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(digits.images):
        ink = (255 - pixels * 255 / 16).astype(np.uint8)  # 0..16 grey levels → dark ink on white
        Image.fromarray(ink, mode="L").resize((32, 32), Image.Resampling.NEAREST).save(images / f"{i:04d}.png")
    paths = {}
    for task, (question, answer) in TASKS.items():
        rows = [{"id": f"{task}-{i:04d}", "image": f"{i:04d}.png",
                 "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                   {"from": "gpt", "value": answer(int(d))}]}
                for i, d in enumerate(digits.target)]
        paths[task] = out / f"{task}.json"
        paths[task].write_text(json.dumps(rows))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/external-digits")
    parser.add_argument("--strategy", action="append", default=None, help="repeat for several (default: decoupled)")
    args, rest = parser.parse_known_args()
    out = Path(args.out)
    strata = [str(Path(sys.executable).with_name("strata"))]  # the console script of this venv
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for task, path in write_llava(out).items():
        subprocess.run([*strata, "data", "import-llava", str(path), str(out / "images"), str(data / f"{task}.parquet"),
                        "--val-fraction", "0.2", "--test-fraction", "0.2"], check=True)
    (data / "stream.json").write_text(json.dumps({"tasks": list(TASKS)}))
    strategies = [a for s in (args.strategy or ["decoupled"]) for a in ("--strategy", s)]
    subprocess.run([*strata, "run", "--data", str(data), "--tasks", str(len(TASKS)), *strategies, "--gate", "report",
                    "--out", str(out / "run"), *rest], check=True)


if __name__ == "__main__":
    main()
