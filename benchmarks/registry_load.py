"""Cold-loading an adapter from the registry, and what checking its hashes costs.

    .venv/bin/python benchmarks/registry_load.py            # the test backbone's LoRA and a 2048-wide backbone's LoRA
    .venv/bin/python benchmarks/registry_load.py --quick    # the small adapter only

A cold load is what a serving replica does for an adapter it does not hold: read the version's
files from the registry, check every file against the manifest's SHA-256, write them to a local
directory, and attach them to the resident backbone with `PeftModel.from_pretrained`. The
backbone is already loaded (it is shared by every adapter), so it is not part of the time.
Each adapter is measured side by side in one run, with the same reads done without hashing,
so the hash check's share of the cold load is the difference. Median of `--repeats` runs.

Writes benchmarks/results/registry_load.json, a plot beside it, and prints the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from peft import PeftModel
from rich.console import Console
from rich.table import Table

from strata.adapters.lora import add_adapter, save_adapter
from strata.atomic import write_text
from strata.backbone.load import load_backbone, resolve
from strata.backbone.tiny import RECIPES, build_model
from strata.config import AdapterSpec, BackboneSpec
from strata.eval.plots import save_figure
from strata.registry import Ref, Registry, backbone_info
from strata.registry.store import MANIFEST
from strata.storage import read_bytes, read_json

RESULTS = Path(__file__).resolve().parent / "results"


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def backbones(work: Path, quick: bool) -> dict[str, tuple[Path, str]]:
    """Backbone dirs to measure on: the built-in test one, and (unless quick) a 2048-wide one from config."""
    tiny = resolve(BackboneSpec("builtin:test"))
    found = {"builtin:test, LoRA r8": (tiny, "builtin:test")}
    if not quick:
        _, processor = load_backbone(BackboneSpec("builtin:test"), tiny)
        wide = build_model(replace(RECIPES["builtin:test"], width=2048, heads=16, text_layers=4), processor)
        wide.save_pretrained(work / "wide")
        processor.save_pretrained(work / "wide")
        found["width 2048 x 4 layers, LoRA r64"] = (work / "wide", str(work / "wide"))
    return found


def measure(label: str, path: Path, source: str, work: Path, repeats: int, console: Console) -> dict:
    """Push one adapter, then time the cold load with and without the hash check."""
    spec = BackboneSpec(source)
    rank = 64 if "r64" in label else 8
    model, _ = load_backbone(spec, path)
    info = backbone_info(source, path, model)
    peft_model = add_adapter(model, "a", AdapterSpec(visual_rank=rank, text_rank=rank))
    src = save_adapter(peft_model, "a", work / f"src-{rank}")
    reg = Registry(str(work / "registry"))
    ref = Ref(f"bench-r{rank}", "lora", 1)  # one stream per backbone: a stream pins its backbone
    reg.push(ref, src, {"strategy": "bench"}, info)
    where = f"{reg.root}/{ref.stream}/{ref.adapter}/v1"
    files = read_json(reg.fs, f"{where}/{MANIFEST}")["files"]
    size = sum(f["bytes"] for f in files.values())
    resident, _ = load_backbone(spec, path)  # the shared backbone a replica keeps loaded

    def fetch_checked() -> None:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            reg.fetch(ref, Path(tmp))

    def fetch_unchecked() -> None:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            for name in files:
                (Path(tmp) / name).write_bytes(read_bytes(reg.fs, f"{where}/{name}"))

    def hash_only() -> None:
        for name in files:
            hashlib.sha256(read_bytes(reg.fs, f"{where}/{name}")).hexdigest()

    def cold_load() -> None:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            loaded = PeftModel.from_pretrained(resident, str(reg.fetch(ref, Path(tmp))), adapter_name="a")
            loaded.unload()  # detach again, so the next repeat starts from the bare backbone

    console.log(f"{label}: adapter {size / 2**20:.2f} MiB, {repeats} repeats")
    row = {"adapter": label, "mib": size / 2**20,
           "fetch_checked_ms": 1e3 * median_seconds(fetch_checked, repeats),
           "fetch_unchecked_ms": 1e3 * median_seconds(fetch_unchecked, repeats),
           "hash_ms": 1e3 * median_seconds(hash_only, repeats),
           "cold_load_ms": 1e3 * median_seconds(cold_load, repeats)}
    row["check_overhead_ms"] = row["fetch_checked_ms"] - row["fetch_unchecked_ms"]
    row["check_share_of_cold_load"] = row["check_overhead_ms"] / row["cold_load_ms"]
    return row


def report(rows: list[dict], console: Console, out: Path) -> None:
    """Print the table, write JSON and the plot."""
    table = Table(title="cold load from the registry (median ms)")
    for col in ("adapter", "MiB", "fetch + check", "fetch, no check", "check overhead", "of cold load",
                "cold load"):
        table.add_column(col, justify="left" if col == "adapter" else "right")
    for r in rows:
        table.add_row(r["adapter"], f"{r['mib']:.2f}", f"{r['fetch_checked_ms']:.1f}", f"{r['fetch_unchecked_ms']:.1f}",
                      f"{r['check_overhead_ms']:.1f}", f"{100 * r['check_share_of_cold_load']:.1f}%",
                      f"{r['cold_load_ms']:.1f}")
    console.print(table)
    meta = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "python": platform.python_version()}
    write_text(out, json.dumps({"meta": meta, "rows": rows}, indent=1))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [r["adapter"] for r in rows]
    check = [r["check_overhead_ms"] for r in rows]
    rest = [r["cold_load_ms"] - r["check_overhead_ms"] for r in rows]
    ax.barh(labels, rest, label="read, write, PEFT attach")
    ax.barh(labels, check, left=rest, label="SHA-256 check")
    ax.set_xlabel("cold load (ms, median)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out.with_suffix(".png"))
    plt.close(fig)
    console.print(f"wrote {out} and {out.with_suffix('.png')}")


def main(argv: list[str] | None = None) -> None:
    """Measure every adapter size and write the results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny backbone's adapter only")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=RESULTS / "registry_load.json")
    args = p.parse_args(argv)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="strata-registry-") as tmp:
        work = Path(tmp)
        rows = [measure(label, path, source, work, args.repeats, console)
                for label, (path, source) in backbones(work, args.quick).items()]
    report(rows, console, args.out)


if __name__ == "__main__":
    main()
