"""Every backbone family Strata trains, at one LM width built from config: adapter cost and mixed serving.

    .venv/bin/python benchmarks/families.py --time-budget 540
    .venv/bin/python benchmarks/families.py --families gemma3 internvl --update   # rerun two, keep the rest

Families: every model type tests/family_models.py builds (llava, llava_onevision, qwen2_vl, qwen2_5_vl,
qwen3_vl, idefics3, smolvlm, gemma3, internvl), each with its own processor and chat template, on
random weights. The test configs are widened: LM width 512 (4 layers, 8 heads, 4 key/value heads,
FFN 2x), vision tower width 256 (2 layers, 4 heads); image and patch sizes stay the tests', so the
processors still fit. Per family:
  trainable %     under strata's add_adapter with AdapterSpec(visual_rank=16, text_rank=16): LoRA r16
                  on the vision layers that reach the LM, the projector and the LM, placed by the
                  family's description (strata/backbone/families).
  step time       LoRA vs full fine-tuning (AdamW), stepped in interleaved rounds in this process
                  (train_cost.py's timing loop), medians; ratio LoRA / full FT.
  peak memory     each variant in a fresh process from a forkserver (train_cost.py's method): peak
                  live tensor bytes over one step from the PyTorch profiler, and peak RSS growth.
  mixed forward   one 16-row batch whose rows use 16 different LoRA adapters through serving's
                  MixedLoRA (as AdapterHost batches them), against a loop of 16 one-row forwards with
                  PEFT's set_adapter; ratio mixed / loop, medians of interleaved repeats.
Writes benchmarks/results/families.json (atomically) and prints a table. Linux only (/proc).
A family that fails is reported with its error, not skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # family_models: the families' configs, processors and templates

import pyarrow as pa
import torch
import transformers
from family_models import CONFIGS, save_checkpoint
from train_cost import Variant, current_rss, in_fresh_process, peak_rss, tensor_timeline_peak, time_variants, train_step

from strata.adapters.lora import add_adapter
from strata.atomic import write_text
from strata.backbone.families import family_of
from strata.backbone.load import checkpoint_family, freeze, load_processor
from strata.backbone.tiny import TinyRecipe, build_processor
from strata.config import AdapterSpec
from strata.data import benchmark
from strata.data.collate import collate, encode_table
from strata.data.template import IMAGE_TOKEN
from strata.serving.mixed_lora import MixedLoRA

FAMILIES = tuple(CONFIGS)
SPEC = AdapterSpec(visual_rank=16, text_rank=16)
ADAPTERS = 16
LR = 1e-4
N_BATCHES = 2
PROBE_STEPS = 2  # steps before the memory reading, so AdamW state exists
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "families.json"
Batch = dict[str, torch.Tensor]


def widen(config: transformers.PretrainedConfig, width: int, vision_width: int, layers: int,
          heads: int) -> transformers.PretrainedConfig:
    """The family's test config with the LM at `width` and the vision tower at `vision_width`."""
    d = config.to_dict()
    text, vision = d["text_config"], d["vision_config"]
    head_dim = width // heads
    text.update(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=head_dim)
    text.pop("layer_types", None)  # saved for the test's 3 layers; rebuilt for `layers`
    if "query_pre_attn_scalar" in text:  # Gemma 3 scales queries by 1/sqrt of it: the head size
        text["query_pre_attn_scalar"] = head_dim
    rope = text.get("rope_parameters") or {}
    if "mrope_section" in rope:  # Qwen's rope frequencies split over (time, height, width): head_dim / 2 in all
        old, half = rope["mrope_section"], head_dim // 2
        new = [s * half // sum(old) for s in old]
        rope["mrope_section"] = [new[0] + half - sum(new), *new[1:]]
    vheads = max(1, vision_width // 64)
    if d["model_type"] == "qwen2_vl":  # its vision hidden_size is the merger's output: the LM's width
        vision.update(embed_dim=vision_width, hidden_size=width, num_heads=vheads)
    elif "out_hidden_size" in vision:
        vision.update(hidden_size=vision_width, intermediate_size=2 * vision_width, num_heads=vheads,
                      out_hidden_size=width)
    else:
        vision.update(hidden_size=vision_width, intermediate_size=2 * vision_width, num_attention_heads=vheads)
    return type(config).from_dict(d)


def backbone(family: str, tmp: Path, args: argparse.Namespace) -> tuple[transformers.PretrainedConfig, object]:
    """(widened config, processor) of a family, the processor and token ids as the family tests make them."""
    if family == "llava":  # no checkpoint recipe in family_models: the built-in LLaVA processor, 9 image tokens
        processor = build_processor(TinyRecipe(), benchmark.vocabulary_text())
        config = CONFIGS["llava"]()
        config.image_token_index = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        tok = processor.tokenizer
        text = config.text_config
        text.vocab_size, text.pad_token_id, text.eos_token_id = len(tok), tok.pad_token_id, tok.eos_token_id
        text.bos_token_id = tok.bos_token_id
        config.tie_word_embeddings = True
    else:
        save_checkpoint(family, tmp / family)
        processor = load_processor(tmp / family, checkpoint_family(tmp / family))
        config = transformers.AutoConfig.from_pretrained(tmp / family)
    return widen(config, args.width, args.vision_width, args.layers, args.heads), processor


def build(config: transformers.PretrainedConfig) -> torch.nn.Module:
    """A frozen random model; the same weights in every process."""
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    if config.model_type == "gemma3":  # initialised to zeros, which would cut the vision side off the loss
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.02)
    return freeze(model)


def variant(name: str, config: transformers.PretrainedConfig) -> Variant:
    """Full fine-tuning, or strata's LoRA on the frozen backbone; AdamW over what trains."""
    model = build(config)
    if name == "lora":
        model = add_adapter(model, "bench", SPEC)
    else:
        model.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    return Variant(name, model, opt, cached=False)


def train_batches(processor, batch_size: int) -> list[Batch]:
    """Batches mixing all eight built-in tasks, with answers (the loss is on them)."""
    per_task = -(-N_BATCHES * batch_size // len(benchmark.TASKS))
    table = pa.concat_tables([benchmark.generate_task(t, 0, per_task, 0, 0) for t in benchmark.TASKS])
    enc = encode_table(processor, table, with_answers=True)
    pad = processor.tokenizer.pad_token_id
    # Every N_BATCHES-th row: each batch spans the tasks, which sit in order in the table.
    return [collate(enc.select(list(range(i, len(enc), N_BATCHES))[:batch_size]), pad) for i in range(N_BATCHES)]


def memory_probe(name: str, config: transformers.PretrainedConfig, batches: list[Batch], threads: int,
                 conn) -> None:
    """Child process: one variant's peak RSS growth over training steps, then its peak tensor bytes."""
    torch.set_num_threads(threads)
    v = variant(name, config)
    batches = [{k: t.clone() for k, t in b.items()} for b in batches]  # private: shared pages would count
    gc.collect()
    base = current_rss()
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
        f.write("5")
    for i in range(PROBE_STEPS):
        train_step(v, batches[i % len(batches)])
    growth = peak_rss() - base
    timeline = tensor_timeline_peak(v, batches[PROBE_STEPS % len(batches)])
    params = list(v.model.parameters())
    side = family_of(config).is_vision
    conn.send({"peak_rss_growth_bytes": growth, "rss_after_build_bytes": base,
               "peak_tensor_bytes": timeline["peak_bytes"],
               "peak_tensor_param_bytes": timeline["breakdown_bytes"]["parameter"],
               "params": sum(p.numel() for p in params),
               "trainable_params": sum(p.numel() for p in params if p.requires_grad),
               "vision_params": sum(p.numel() for n, p in v.model.named_parameters() if side(n))})
    conn.close()


def run_probe(name: str, config: transformers.PretrainedConfig, batches: list[Batch], threads: int) -> dict:
    """memory_probe in a fresh process forked from a forkserver that has the heavy imports loaded."""
    return in_fresh_process(name, memory_probe, (name, config, batches, threads))


@torch.no_grad()
def mixed_forward(config: transformers.PretrainedConfig, processor, repeats: int, budget_s: float) -> dict:
    """One 16-row batch over 16 adapters: serving's gathered MixedLoRA against 16 one-row PEFT forwards."""
    model = build(config)
    for i in range(ADAPTERS):
        model = add_adapter(model, f"a{i:02d}", SPEC)
        torch.manual_seed(i)
        for n, p in model.named_parameters():
            if f"lora_B.a{i:02d}." in n:
                p.normal_(0, 0.02)  # PEFT starts B at zero: give each adapter a real update
    model.eval()
    names = [f"a{i:02d}" for i in range(ADAPTERS)]
    enc = encode_table(processor, benchmark.generate_task("colour", 0, 0, 0, ADAPTERS), with_answers=False)
    pad = processor.tokenizer.pad_token_id
    batch = collate(enc, pad)
    batch.pop("labels")
    rows = []
    for i in range(ADAPTERS):
        row = collate(enc.select([i]), pad)
        row.pop("labels")
        rows.append(row)
    # As AdapterHost does: towers that take every image's patch rows (or tiles) flat need their counts.
    flat = enc.flat or "image_sizes" in enc.images
    patches = [len(p) for p in enc.images["pixel_values"]] if flat else None
    mixed = MixedLoRA(model)

    def together() -> None:
        with mixed.select(names, patches) as m:
            m(**batch)

    def loop() -> None:
        for name, row in zip(names, rows):
            model.set_adapter(name)
            model(**row)

    def one_adapter() -> None:  # reference: the same batch on one adapter, PEFT's plain forward
        model.set_adapter(names[0])
        model(**batch)

    paths = {"mixed": together, "per_adapter_loop": loop, "one_adapter": one_adapter}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for f in paths.values():
        f()  # warm-up: stacks built, kernels picked
    start = time.perf_counter()
    for r in range(repeats):  # round-robin, so drift on a busy machine hits every path alike
        for k, f in paths.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and r >= 2:
            break
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {"ms_median": ms, "ms_all": {k: [round(1e3 * t, 1) for t in v] for k, v in times.items()},
            "repeats": len(times["mixed"]), "mixed_over_loop": ms["mixed"] / ms["per_adapter_loop"],
            "mixed_over_loop_min": min(times["mixed"]) / min(times["per_adapter_loop"]),  # least disturbed
            "mixed_over_one_adapter": ms["mixed"] / ms["one_adapter"],
            "patch_rows_flat": flat, "mean_seq_len": batch["attention_mask"].sum(1).float().mean().item()}


def bench_family(family: str, tmp: Path, args: argparse.Namespace, budget_s: float) -> dict:
    """Every figure of one family."""
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    config, processor = backbone(family, tmp, args)
    batches = train_batches(processor, args.batch_size)
    variants = [variant(name, config) for name in ("full_ft", "lora")]
    timing = time_variants(variants, batches, args.warmup, args.steps, budget_s / 2)
    del variants
    gc.collect()
    probes = {name: run_probe(name, config, batches, args.threads) for name in ("full_ft", "lora")}
    forward = mixed_forward(config, processor, args.repeats, budget_s / 2)
    step = {k: 1e3 * statistics.median(v) for k, v in timing["step_s"].items()}
    mem = {k: {"peak_tensor_mb": p["peak_tensor_bytes"] / 2**20,
               "peak_tensor_no_param_mb": (p["peak_tensor_bytes"] - p["peak_tensor_param_bytes"]) / 2**20,
               "peak_rss_growth_mb": p["peak_rss_growth_bytes"] / 2**20,
               "rss_after_build_mb": p["rss_after_build_bytes"] / 2**20} for k, p in probes.items()}
    lora = probes["lora"]
    text = config.text_config
    image_id = getattr(config, "image_token_id", None)
    image_id = config.image_token_index if image_id is None else image_id
    return {
        "config": {"text": {k: getattr(text, k, None) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                                 "num_attention_heads", "num_key_value_heads",
                                                                 "head_dim", "vocab_size")},
                   "vision": config.vision_config.to_diff_dict(),
                   "mean_seq_len": torch.cat([b["attention_mask"].sum(1) for b in batches]).float().mean().item(),
                   "mean_image_tokens": torch.cat([(b["input_ids"] == image_id).sum(1) for b in batches]).float()
                   .mean().item()},
        "params": probes["full_ft"]["params"],
        "vision_params": probes["full_ft"]["vision_params"],  # tower(s) and projector
        "lora_params": lora["trainable_params"],
        "trainable_pct": 100 * lora["trainable_params"] / lora["params"],
        "step_ms_median": step,
        "step_ms_all": {k: [round(1e3 * t, 1) for t in v] for k, v in timing["step_s"].items()},
        "steps_timed": len(timing["step_s"]["lora"]),
        "lora_over_full_ft_step": step["lora"] / step["full_ft"],
        "lora_over_full_ft_step_min": min(timing["step_s"]["lora"]) / min(timing["step_s"]["full_ft"]),
        "memory": mem,
        "lora_over_full_ft_peak_tensor": mem["lora"]["peak_tensor_mb"] / mem["full_ft"]["peak_tensor_mb"],
        "forward": forward,
        "seconds": round(time.perf_counter() - started, 1),
        "loadavg_1min": [load_before, os.getloadavg()[0]],  # above --threads: other processes shared the cores
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python " + shlex.join(sys.argv),
    }


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = report["settings"]
    table = Table(title=f"LM width {cfg['width']}, vision width {cfg['vision_width']}, batch {cfg['batch_size']}, "
                        f"LoRA r{SPEC.text_rank} both towers, {cfg['threads']} threads; medians")
    cols = ("family", "params M", "train %", "LoRA ms", "FT ms", "LoRA/FT", "MB LoRA", "MB FT", "LoRA/FT",
            "RSS+ LoRA", "RSS+ FT", "mixed ms", "loop ms", "mix/loop", "load")
    for col in cols:
        table.add_column(col, justify="left" if col == "family" else "right", no_wrap=col == "family")
    for family, r in report["families"].items():
        if "error" in r:
            table.add_row(family, f"[red]failed: {r['error'][:100]}[/red]", *[""] * (len(cols) - 2))
            continue
        m, f = r["memory"], r["forward"]["ms_median"]
        table.add_row(family, f"{r['params'] / 1e6:.1f}", f"{r['trainable_pct']:.2f}",
                      f"{r['step_ms_median']['lora']:.0f}", f"{r['step_ms_median']['full_ft']:.0f}",
                      f"{r['lora_over_full_ft_step']:.2f}", f"{m['lora']['peak_tensor_mb']:.0f}",
                      f"{m['full_ft']['peak_tensor_mb']:.0f}", f"{r['lora_over_full_ft_peak_tensor']:.2f}",
                      f"{m['lora']['peak_rss_growth_mb']:.0f}", f"{m['full_ft']['peak_rss_growth_mb']:.0f}",
                      f"{f['mixed']:.0f}", f"{f['per_adapter_loop']:.0f}", f"{r['forward']['mixed_over_loop']:.2f}",
                      f"{max(r['loadavg_1min']):.1f}")
    console = Console(width=max(Console().width, 170))
    console.print(table)
    m = report["machine"]
    console.print(f"load avg {m['loadavg_before'][0]:.1f} -> {m['loadavg_after'][0]:.1f} on {m['cpus_usable']} CPUs; "
                  f"{report['seconds']:.0f} s")


def settings(args: argparse.Namespace) -> dict:
    """What the figures depend on; an --update run must match the report it joins."""
    return {"width": args.width, "vision_width": args.vision_width, "layers": args.layers, "heads": args.heads,
            "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
            "threads": args.threads, "adapter": dataclasses.asdict(SPEC),
            "adapters_mixed": ADAPTERS, "optimizer": f"AdamW lr={LR}, weight_decay=0",
            "weights": "random (built from config)"}


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # the test tokenizers' ids trip config range warnings
    transformers.utils.logging.disable_progress_bar()
    load_before, started = os.getloadavg(), time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="strata-families-") as tmp:
        for i, family in enumerate(args.families):
            left = len(args.families) - i
            budget = (args.time_budget - (time.perf_counter() - started)) / left if args.time_budget else float("inf")
            print(f"== {family} ({i + 1}/{len(args.families)})", file=sys.stderr, flush=True)
            try:
                results[family] = bench_family(family, Path(tmp), args, max(budget * 0.6, 1.0))
            except Exception as e:  # noqa: BLE001 - recorded and shown, the other families still run
                traceback.print_exc()
                results[family] = {"error": f"{type(e).__name__}: {e}"}
            gc.collect()
    return {
        "command": "python " + shlex.join(sys.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus_usable": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "peft": __import__("peft").__version__, "device": "cpu",
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
        "settings": settings(args) | {"time_budget_s": args.time_budget},
        "definitions": {
            "trainable_pct": "LoRA parameters / all parameters of the adapted model (LoRA included).",
            "step_ms_median": "zero_grad + forward + backward + AdamW step, wall clock, median; full_ft and lora "
                              "stepped in interleaved rounds, order rotated each round.",
            "peak_tensor_mb": "peak live CPU tensor bytes over one steady-state step (profiler memory timeline), "
                              "fresh process per variant: params + grads + AdamW state + activations.",
            "peak_rss_growth_mb": f"peak RSS over {PROBE_STEPS} steps minus RSS after the build (VmHWM reset).",
            "forward.mixed": f"one {ADAPTERS}-row batch, row i on adapter i, MixedLoRA.select (AdapterHost's path).",
            "forward.per_adapter_loop": f"{ADAPTERS} one-row forwards, PEFT set_adapter before each.",
            "forward.one_adapter": f"the same {ADAPTERS}-row batch on one adapter, plain PEFT forward.",
        },
        "families": results,
        "seconds": round(time.perf_counter() - started, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--width", type=int, default=512, help="LM hidden size")
    p.add_argument("--vision-width", type=int, default=256, help="vision tower hidden size")
    p.add_argument("--layers", type=int, default=4, help="LM layers")
    p.add_argument("--heads", type=int, default=8, help="LM attention heads (key/value heads: half)")
    p.add_argument("--batch-size", type=int, default=8, help="training rows per step")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps per variant first")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats of each forward path")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run; each family's timing stops early (>= 3 rounds) past its share")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report")
    p.add_argument("--update", action="store_true",
                   help="keep the families of an existing --out that this run does not measure (a shared box: "
                        "rerun the ones other load disturbed)")
    args = p.parse_args(argv)
    if args.width % args.heads or (args.width // args.heads) % 2:
        p.error("--width must split into an even head size over --heads")
    return args


def merge(report: dict, old: dict) -> dict:
    """`report` plus the families of an earlier report that this run did not measure again."""
    families = {**old["families"], **report["families"]}
    report["families"] = {f: families[f] for f in FAMILIES if f in families}
    report["commands"] = old.get("commands", [old["command"]]) + [report["command"]]
    return report


if __name__ == "__main__":
    cli = parse_args()
    earlier = json.loads(cli.out.read_text()) if cli.update and cli.out.exists() else None
    if earlier and any(earlier["settings"].get(k) != v for k, v in settings(cli).items()):
        raise SystemExit(f"--update: {cli.out} was measured with other settings; rerun every family instead")
    report = main(cli)
    if earlier:
        report = merge(report, earlier)
    print_table(report)
    write_text(cli.out, json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {cli.out}")
