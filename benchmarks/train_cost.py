"""Training cost of LoRA adapters vs full fine-tuning, side by side on one random-init backbone.

    .venv/bin/python benchmarks/train_cost.py --width 512 --steps 40 --warmup 3 --time-budget 200

(about 2 minutes on 2 idle cores; --time-budget caps the timing rounds when the box is busy.)

Variants (all AdamW, identical weights at start, identical batches):
  full_ft                  every parameter trainable.
  lora_all                 PEFT LoRA r16 on vision tower, projector and LM (strata's lora_config).
  lora_text                LoRA r16 on the LM only, plain forward: the reference for the next row.
  lora_text_cached_vision  LoRA r16 on the LM only; the frozen tower + projector run once per batch
                           under torch.no_grad and the LM gets `inputs_embeds`.

Step times: all variants live in this process and are stepped in interleaved rounds (the order
rotates every round), reported as medians, because other processes may share the 2 cores.
Memory: a fresh process per variant (forked from a forkserver before any tensor work), which
reads its own peak RSS and the PyTorch profiler's memory timeline. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import multiprocessing as mp
import os
import platform
import random
import resource
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# Quiet the profiler's C++ "allocated before profiling" warnings (must be set before torch loads).
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import pyarrow as pa
import torch
from torch.profiler import ProfilerActivity, profile

from strata.adapters.lora import add_adapter
from strata.atomic import write_text
from strata.backbone.tiny import TinyRecipe, build_model, build_processor
from strata.config import AdapterSpec
from strata.data import benchmark
from strata.data.collate import collate, encode_table
from strata.data.template import IMAGE_TOKEN

# PEFT asks transformers a deprecated question on every wrap; the warning says nothing about us.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
# export_memory_timeline is deprecated in favour of a CUDA-only API; on CPU it is all there is.
warnings.filterwarnings("ignore", message=".*export_memory_timeline.*", category=FutureWarning)

VARIANTS = ("full_ft", "lora_all", "lora_text", "lora_text_cached_vision")
SPECS = {
    "lora_all": AdapterSpec(visual_rank=16, text_rank=16),
    "lora_text": AdapterSpec(visual_rank=0, text_rank=16),
    "lora_text_cached_vision": AdapterSpec(visual_rank=0, text_rank=16),
}
TARGET_RATIO = 0.6  # the goal: adapter step time <= 0.6x full FT at width 512
LOSS_TOL = 1e-5
LR = 1e-4
BATCH_SIZE = 16
N_BATCHES = 4  # distinct batches cycled through; every variant gets the same one in a round
PROBE_STEPS = 2  # RSS steps; from step 2 on, AdamW state exists during backward
Batch = dict[str, torch.Tensor]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "train_cost.json"
# Column order of the profiler's memory timeline (torch.profiler._memory_profiler), after column 0.
TIMELINE_CATEGORIES = ("parameter", "optimizer_state", "input", "temporary", "activation",
                       "gradient", "autograd_detail", "unknown")
MEMORY_DEFINITIONS = {
    "peak_tensor_mb": (
        "Peak bytes of live CPU tensors during training steps, from the PyTorch profiler's memory "
        "timeline (profile_memory=True, export_memory_timeline(device='cpu')): parameters + "
        "gradients + AdamW state + autograd activations + temporaries + inputs. No allocator "
        f"overhead. Measured over one steady-state step (after {PROBE_STEPS} others, so AdamW "
        "state exists) in a fresh process."
    ),
    "peak_tensor_no_param_mb": "peak_tensor_mb minus parameter bytes at that instant: the cost "
                               "of training on top of holding the model.",
    "peak_breakdown_mb": "peak_tensor_mb split by the profiler's categories at the peak instant.",
    "peak_rss_growth_mb": (
        "Same fresh process, before profiling: peak resident set size (VmHWM, reset through "
        "/proc/self/clear_refs once model, optimizer and batches exist) over the first "
        f"{PROBE_STEPS} training steps, minus the RSS at the reset. Excludes the weights; "
        "includes allocator retention and fragmentation, and lazy runtime buffers that are the "
        "same for every variant, so at small widths it is mostly overhead."
    ),
    "ru_maxrss_growth_mb": "resource.getrusage(RUSAGE_SELF).ru_maxrss minus the same baseline.",
    "grad_mb / optimizer_state_mb": "Exact: one grad per trainable param; optimizer.state tensors.",
}


@dataclass
class Variant:
    """A model being trained one way, with its optimizer."""

    name: str
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    cached: bool  # feed the LM no-grad image embeddings instead of pixels


def make_recipe(args: argparse.Namespace) -> TinyRecipe:
    """The backbone under test; random init, no pretraining."""
    return TinyRecipe(width=args.width, heads=args.heads, vision_layers=2, text_layers=4)


def make_batches(processor, n_batches: int, seed: int = 0) -> list[Batch]:
    """Batches of 16 rows mixing all eight tasks: 9 image tokens + ~30 text tokens per row."""
    per_task = -(-n_batches * BATCH_SIZE // len(benchmark.TASKS))
    tables = [benchmark.generate_task(t, seed, per_task, 0, 0) for t in benchmark.TASKS]
    enc = encode_table(processor, pa.concat_tables(tables), with_answers=True)
    order = list(range(len(enc)))
    random.Random(seed).shuffle(order)
    pad = processor.tokenizer.pad_token_id
    return [collate(enc.select(order[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]), pad)
            for i in range(n_batches)]


def build_variant(name: str, recipe: TinyRecipe, processor) -> Variant:
    """Same seed, same weights; LoRA variants wrap the model with strata's add_adapter."""
    model = build_model(recipe, processor)
    if name in SPECS:
        model = add_adapter(model, "bench", SPECS[name])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    return Variant(name, model, opt, cached=name.endswith("cached_vision"))


def cached_inputs(model: torch.nn.Module, batch: Batch) -> Batch:
    """Run the frozen tower + projector outside autograd and splice its output into the embeddings.

    Mirrors LlavaModel.forward: the image features replace the <image> placeholder embeddings.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids = batch["input_ids"]  # (B, T)
    with torch.no_grad():
        out = base.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
        feats = torch.cat(out.pooler_output)  # (B * P, H), P = image tokens per row
        embeds = base.get_input_embeddings()(ids)  # (B, T, H)
        mask = (ids == base.config.image_token_index).unsqueeze(-1)  # (B, T, 1)
        embeds = embeds.masked_scatter(mask, feats)
    return {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"],
            "labels": batch["labels"]}


def train_step(v: Variant, batch: Batch) -> float:
    """One optimizer step; returns the seconds spent in the no-grad vision pass (0 if none)."""
    v.opt.zero_grad(set_to_none=True)
    vision_s = 0.0
    if v.cached:
        t0 = time.perf_counter()
        inputs = cached_inputs(v.model, batch)
        vision_s = time.perf_counter() - t0
    else:
        inputs = batch
    loss = v.model(**inputs).loss
    loss.backward()
    v.opt.step()
    return vision_s


def time_variants(
    variants: list[Variant], batches: list[Batch], warmup: int, steps: int, budget_s: float | None
) -> dict:
    """Interleaved timing: each round steps every variant once, in an order rotated per round.

    Stops early (after at least 3 timed rounds) once the rounds have taken budget_s seconds.
    """
    out = {key: {v.name: [] for v in variants} for key in ("step_s", "cpu_s", "vision_s")}
    start = time.perf_counter()
    for r in range(warmup + steps):
        batch = batches[r % len(batches)]
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            t0, c0 = time.perf_counter(), time.process_time()
            vision_s = train_step(v, batch)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r >= warmup:
                out["step_s"][v.name].append(dt)
                out["cpu_s"][v.name].append(dc)
                out["vision_s"][v.name].append(vision_s)
        spent = time.perf_counter() - start
        last = "  ".join(f"{n} {1e3 * t[-1]:.0f}" for n, t in out["step_s"].items() if t)
        print(f"round {r + 1}/{warmup + steps} ({spent:.0f} s){'  ms: ' + last if last else ''}",
              file=sys.stderr, flush=True)
        if budget_s is not None and spent > budget_s and r + 1 - warmup >= 3:
            print(f"time budget {budget_s:.0f} s spent: stopping after {r + 1 - warmup} timed "
                  "steps", file=sys.stderr, flush=True)
            break
    return out


def check_cached_loss(v: Variant, batch: Batch) -> dict:
    """The cached-vision loss and LoRA grads must equal the plain forward's on the same batch.

    Run on the benchmark's own (trained, so LoRA B != 0) cached-vision model.
    """
    results = []
    for inputs in (batch, cached_inputs(v.model, batch)):
        v.model.zero_grad(set_to_none=True)
        loss = v.model(**inputs).loss
        loss.backward()
        grads = [p.grad.clone() for p in v.model.parameters() if p.requires_grad]
        results.append((loss.item(), grads))
    v.model.zero_grad(set_to_none=True)
    (ref, g_ref), (cached, g_cached) = results
    diff = abs(ref - cached)
    return {
        "loss_uncached": ref,
        "loss_cached": cached,
        "abs_diff": diff,
        "grad_max_abs_diff": max((a - b).abs().max().item() for a, b in zip(g_ref, g_cached)),
        "tolerance": LOSS_TOL,
        "passed": diff <= LOSS_TOL,
    }


def current_rss() -> int:
    """Resident set size now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size (VmHWM) since start or the last clear_refs reset, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def tensor_timeline_peak(v: Variant, batch: Batch) -> dict:
    """Peak live tensor bytes over one step, with the per-category split at the peak."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        train_step(v, batch)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())  # sizes: (n_events, 1 + n_categories)
    totals = [sum(row) for row in sizes]
    peak = max(range(len(totals)), key=totals.__getitem__)
    return {"peak_bytes": totals[peak],
            "breakdown_bytes": dict(zip(TIMELINE_CATEGORIES, sizes[peak][1:]))}


def memory_probe(name: str, args: argparse.Namespace, batches: list[Batch], conn) -> None:
    """Child process: build one variant, then measure RSS growth and the tensor-memory timeline."""
    torch.set_num_threads(args.threads)
    recipe = make_recipe(args)
    processor = build_processor(recipe, benchmark.vocabulary_text())
    v = build_variant(name, recipe, processor)
    # Private copies: tensors arrive in shared memory, whose first touch would count as growth.
    batches = [{k: t.clone() for k, t in b.items()} for b in batches]
    gc.collect()
    base = current_rss()
    try:  # "5" resets VmHWM (and ru_maxrss) to the current RSS, so build-time spikes drop out
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after /proc/self/clear_refs reset"
    except OSError:
        method = "ru_maxrss (no reset possible: build-time peaks can hide training growth)"
    for i in range(PROBE_STEPS):
        train_step(v, batches[i % len(batches)])
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    peak = peak_rss() if method.startswith("VmHWM") else maxrss
    timeline = tensor_timeline_peak(v, batches[PROBE_STEPS % len(batches)])  # profiler costs RSS
    params = list(v.model.parameters())
    trainable = [p for p in params if p.requires_grad]
    conn.send({
        "rss_after_build_bytes": base,
        "peak_rss_growth_bytes": peak - base,
        "ru_maxrss_growth_bytes": maxrss - base,
        "rss_method": method,
        "peak_tensor_bytes": timeline["peak_bytes"],
        "peak_breakdown_bytes": timeline["breakdown_bytes"],
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in trainable),
        "param_bytes": sum(p.nbytes for p in params),
        "grad_bytes": sum(p.nbytes for p in trainable),
        "optimizer_state_bytes": sum(t.nbytes for st in v.opt.state.values()
                                     for t in st.values() if torch.is_tensor(t)),
    })
    conn.close()


def run_probe(name: str, args: argparse.Namespace, batches: list[Batch]) -> dict:
    """Run memory_probe for one variant in a fresh process forked from a forkserver."""
    return in_fresh_process(name, memory_probe, (name, args, batches))


def in_fresh_process(name: str, target, args: tuple) -> dict:
    """`target(*args, conn)` in a fresh process forked from a forkserver; what it sends on `conn`."""
    ctx = mp.get_context("forkserver")
    # Python < 3.13 never preloads __main__ into the server, so name the heavy imports, or
    # every probe re-imports torch and transformers (~7 s each on 2 busy cores).
    ctx.set_forkserver_preload(["torch", "transformers", "peft", "strata.adapters.lora",
                                "strata.backbone.tiny", "strata.data.collate"])
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, send))
    proc.start()
    send.close()
    try:
        result = recv.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"memory probe for {name} died (exit code {proc.exitcode})") from None
    proc.join()
    return result


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def mb(n: float) -> float:
    return n / 2**20


def summarise(name: str, timing: dict, probe: dict) -> dict:
    """One variant's row of the report (ratios are added once full_ft's row exists)."""
    steps_s = timing["step_s"][name]
    bd = probe["peak_breakdown_bytes"]
    return {
        "step_ms_median": 1e3 * statistics.median(steps_s),
        "step_ms_min": 1e3 * min(steps_s),
        "step_ms_all": [round(1e3 * t, 1) for t in steps_s],
        "step_cpu_ms_median": 1e3 * statistics.median(timing["cpu_s"][name]),
        "vision_nograd_ms_median": 1e3 * statistics.median(timing["vision_s"][name]),
        "peak_tensor_mb": mb(probe["peak_tensor_bytes"]),
        "peak_tensor_no_param_mb": mb(probe["peak_tensor_bytes"] - bd["parameter"]),
        "peak_breakdown_mb": {k: round(mb(b), 2) for k, b in bd.items()},
        "peak_rss_growth_mb": mb(probe["peak_rss_growth_bytes"]),
        "ru_maxrss_growth_mb": mb(probe["ru_maxrss_growth_bytes"]),
        "rss_after_build_mb": mb(probe["rss_after_build_bytes"]),
        "param_mb": mb(probe["param_bytes"]),
        "grad_mb": mb(probe["grad_bytes"]),
        "optimizer_state_mb": mb(probe["optimizer_state_bytes"]),
        "params": probe["params"],
        "trainable_params": probe["trainable_params"],
        "trainable_pct": 100 * probe["trainable_params"] / probe["params"],
    }


def main(args: argparse.Namespace) -> dict:
    """Time all variants interleaved, check the cached path, then probe memory one by one."""
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    recipe = make_recipe(args)
    processor = build_processor(recipe, benchmark.vocabulary_text())
    batches = make_batches(processor, N_BATCHES)
    variants = [build_variant(name, recipe, processor) for name in VARIANTS]
    timing = time_variants(variants, batches, args.warmup, args.steps, args.time_budget)
    timed_s = time.perf_counter() - started
    check = check_cached_loss(variants[VARIANTS.index("lora_text_cached_vision")], batches[0])
    del variants
    gc.collect()
    probes = {name: run_probe(name, args, batches) for name in VARIANTS}

    rows = {name: summarise(name, timing, probes[name]) for name in VARIANTS}
    full = rows["full_ft"]
    for r in rows.values():
        for key in ("step_ms_median", "step_ms_min", "step_cpu_ms_median", "peak_tensor_mb",
                    "peak_tensor_no_param_mb", "peak_rss_growth_mb"):
            r[f"{key}_ratio"] = ratio(r[key], full[key])
        r["meets_target"] = r["step_ms_median_ratio"] <= TARGET_RATIO

    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches]).float()
    return {
        "command": "python " + shlex.join(sys.argv),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__,
            "loadavg_before": load_before,  # > threads means other processes shared the cores
            "loadavg_after": os.getloadavg(),
        },
        "config": {
            "recipe": dataclasses.asdict(recipe),
            "batch_size": BATCH_SIZE,
            "image_tokens": int((batches[0]["input_ids"][0] == image_id).sum()),
            "mean_seq_len": lengths.mean().item(),
            "warmup": args.warmup,
            "steps": args.steps,
            "steps_timed": len(timing["step_s"]["full_ft"]),  # < steps if --time-budget ran out
            "time_budget_s": args.time_budget,
            "threads": args.threads,
            "optimizer": f"AdamW lr={LR}, weight_decay=0",
            "lora": {k: dataclasses.asdict(s) for k, s in SPECS.items()},
            "timing": "interleaved rounds, order rotated each round; step = zero_grad + forward "
                      "(incl. the no-grad vision pass for the cached variant) + backward + AdamW "
                      "step. step_ms_* is wall clock (median, and min: the least disturbed by "
                      "other load); step_cpu_ms_median is process CPU time (OpenMP spin-waits "
                      "count, so it inflates under contention too)",
            "target_step_time_ratio": TARGET_RATIO,
            "smoke_test": args.smoke_test,
        },
        "memory_definitions": MEMORY_DEFINITIONS,
        "rss_method": probes["full_ft"]["rss_method"],
        "cached_vision_loss_check": check,
        "variants": rows,
        "seconds": {"timing": round(timed_s, 1), "total": round(time.perf_counter() - started, 1)},
    }


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = report["config"]
    title = (f"Train step cost: width {cfg['recipe']['width']}, batch {cfg['batch_size']}, "
             f"median of {cfg['steps_timed']} steps, {cfg['threads']} threads")
    table = Table(title=title)
    cols = ("variant", "step ms", "x FT", "min x FT", "CPU x FT", "peak tensors MB", "x FT",
            "minus params MB", "x FT", "peak RSS +MB", "x FT", "trainable %")
    for col in cols:
        left = col == "variant"
        table.add_column(col, justify="left" if left else "right", no_wrap=left)
    fmt = lambda x, f: "-" if x is None else format(x, f)
    for name, r in report["variants"].items():
        table.add_row(
            name, fmt(r["step_ms_median"], ".0f"), fmt(r["step_ms_median_ratio"], ".2f"),
            fmt(r["step_ms_min_ratio"], ".2f"),
            fmt(r["step_cpu_ms_median_ratio"], ".2f"),
            fmt(r["peak_tensor_mb"], ".1f"), fmt(r["peak_tensor_mb_ratio"], ".2f"),
            fmt(r["peak_tensor_no_param_mb"], ".1f"),
            fmt(r["peak_tensor_no_param_mb_ratio"], ".2f"),
            fmt(r["peak_rss_growth_mb"], ".1f"), fmt(r["peak_rss_growth_mb_ratio"], ".2f"),
            fmt(r["trainable_pct"], ".2f"),
        )
    console = Console(width=max(Console().width, 140))
    console.print(table)
    chk = report["cached_vision_loss_check"]
    m = report["machine"]
    console.print(f"cached-vision loss check: |loss diff| {chk['abs_diff']:.1e}, max |grad diff| "
                  f"{chk['grad_max_abs_diff']:.1e} -> {'PASS' if chk['passed'] else 'FAIL'}; "
                  f"load avg {m['loadavg_before'][0]:.1f} -> {m['loadavg_after'][0]:.1f} "
                  f"on {m['cpus_usable']} CPUs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=512, help="hidden size of tower and LM")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--steps", type=int, default=30,
                   help="timed steps per variant; each costs ~4 train steps of wall time")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the timing rounds; stop early once spent (>= 3 timed steps)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="JSON report (default benchmarks/results/train_cost.json)")
    p.add_argument("--smoke-test", action="store_true", help="width 64, 2 steps: checks it runs")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.width, args.heads, args.steps, args.warmup = 64, 4, 2, 1
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


if __name__ == "__main__":
    cli = parse_args()
    result = main(cli)
    print_table(result)
    write_text(cli.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {cli.out}")
