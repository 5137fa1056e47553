"""Can Decoupled's router tell apart two tasks that share their images and differ by one word?

    .venv/bin/python benchmarks/router_pair.py [--out runs/router-pair] [--stream runs/default] [-- STRATA RUN ARGS]

The pair is made from the built-in `exists` task's images:
- `there`: "Is there a {colour} {shape} in the image?" with the task's yes/no answer;
- `not`: "Is there not a {colour} {shape} in the image?" with the answer flipped.

Both are learned with `strata run --strategy decoupled` (defaults otherwise; extra arguments after
`--` go to `strata run`), then the router's confusion matrix (rows: the task a test row belongs
to; columns: the adapter it was routed to) is printed and saved, for the pair and, with
`--stream`, for the Decoupled run of a whole stream (its `predictions.parquet`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from strata.data.benchmark import generate_task
from strata.data.schema import write_table

OBJECT = re.compile(r"\ba (\w+) (\w+)\b")  # every `exists` prompt names "a {colour} {shape}"
FLIP = {"yes": "no", "no": "yes"}


def pair_tables(seed: int, n_train: int, n_val: int, n_test: int) -> dict[str, pa.Table]:
    """The `there` and `not` tasks over the same `exists` images."""
    rows = generate_task("exists", seed, n_train, n_val, n_test).to_pylist()
    there, negated = [], []
    for row in rows:
        match = OBJECT.search(row["prompt"])
        if match is None:
            raise ValueError(f"row {row['id']}: prompt {row['prompt']!r} names no 'a <colour> <shape>'")
        colour, shape = match.groups()
        there.append({**row, "id": f"there-{row['id']}", "prompt": f"Is there a {colour} {shape} in the image?"})
        negated.append({**row, "id": f"not-{row['id']}", "prompt": f"Is there not a {colour} {shape} in the image?",
                        "answer": FLIP[row["answer"]]})
    schema = generate_task("exists", seed, 0, 0, 0).schema
    return {"there": pa.Table.from_pylist(there, schema=schema), "not": pa.Table.from_pylist(negated, schema=schema)}


def confusion(predictions: pa.Table) -> dict[str, dict[str, int]]:
    """Rows routed per (task, adapter) after the last task, from a run's predictions.parquet."""
    last = predictions["after_task"].to_pylist()[-1]
    matrix: dict[str, dict[str, int]] = {}
    for row in predictions.to_pylist():
        if row["after_task"] == last:
            per_task = matrix.setdefault(row["task"], {})
            per_task[row["adapter"]] = per_task.get(row["adapter"], 0) + 1
    return matrix


def accuracy(matrix: dict[str, dict[str, int]]) -> float:
    """Percent of rows routed to their own task's adapter."""
    total = sum(sum(row.values()) for row in matrix.values())
    return 100.0 * sum(row.get(task, 0) for task, row in matrix.items()) / max(total, 1)


def show(title: str, matrix: dict[str, dict[str, int]]) -> None:
    """Print a confusion matrix as a table."""
    adapters = sorted({a for row in matrix.values() for a in row})
    print(f"\n{title}: router accuracy {accuracy(matrix):.1f}%  (rows: task, columns: adapter)")
    print(f"{'':>10} " + " ".join(f"{a:>9}" for a in adapters))
    for task, row in matrix.items():
        print(f"{task:>10} " + " ".join(f"{row.get(a, 0):>9}" for a in adapters))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/router-pair")
    ap.add_argument("--stream", help="a `strata run` output dir whose decoupled/predictions.parquet to read too")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("run_args", nargs="*", help="extra `strata run` arguments (after --)")
    args = ap.parse_args()
    out = Path(args.out)
    data = out / "data"
    for name, table in pair_tables(args.seed, 1000, 100, 500).items():
        write_table(table, data / f"{name}.parquet")
    (data / "stream.json").write_text(json.dumps({"tasks": ["there", "not"]}))
    started = time.time()
    cmd = [str(Path(sys.executable).parent / "strata"), "run", "--data", str(data), "--tasks", "2",
           "--strategy", "decoupled", "--gate", "report", "--out", str(out / "run"), *args.run_args]
    subprocess.run(cmd, check=True)
    result = {"command": " ".join(cmd), "wall_s": round(time.time() - started, 1),
              "pair": confusion(pq.read_table(out / "run" / "decoupled" / "predictions.parquet")),
              "metrics": {k: v for k, v in json.loads((out / "run" / "decoupled" / "metrics.json").read_text()).items()
                          if k in ("accuracy_matrix", "faa", "forgetting", "router_accuracy")}}
    show("pair (there / not)", result["pair"])
    if args.stream:
        result["stream"] = confusion(pq.read_table(Path(args.stream) / "decoupled" / "predictions.parquet"))
        show(f"stream ({args.stream})", result["stream"])
    dest = Path(__file__).parent / "results" / f"router_pair-{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.write_text(json.dumps(result, indent=2))
    print(f"\nsaved {dest}")


if __name__ == "__main__":
    main()
