"""Serving: mixed-adapter batches, adapter switches, cold loads, and throughput over HTTP on loopback.

    .venv/bin/python benchmarks/serve.py            # width-512 tiny LLaVA, 16 adapters (a few minutes)
    .venv/bin/python benchmarks/serve.py --quick    # the test backbone, fewer repeats

All on one backbone built from config (width 512, untrained: speed does not depend on the weights)
with 16 LoRA adapters (rank 8, vision tower + projector + LM), side by side in one run:
  forward     one batch of 32 rows spread over 16 adapters: Strata's gathered mixed LoRA, PEFT's
              `adapter_names` path, and one PEFT forward per adapter; against a 1-adapter batch.
  switch      in-process `AdapterHost`: 1-token requests alternating between two resident
              adapters against the same adapter every time, in interleaved blocks of 10 (p50/p99
              over `--switches` requests each);
              PEFT's `set_adapter` timed alone for reference.
  cold load   `AdapterHost.load` of an adapter that is not resident (registry fetch, hash check,
              PEFT attach).
  http        the Serve app on loopback, 32 concurrent clients, 8-token answers: 1 adapter, 16
              adapters uniform, 16 adapters skewed (Zipf, s=1.2); requests/s.
  first token 8 concurrent clients, 32 tokens forced (`ignore_eos`), the default batch window:
              time to the first streamed token and to the last, beside an unstreamed answer.
  hot spread  2 replicas, 90% of the requests on one adapter: each replica's share of them
              (from /v1/stats), and how many requests failed.
Writes benchmarks/results/serve.json, a plot beside it, and prints the tables.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import socket
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from http.client import HTTPConnection
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from strata.adapters.lora import add_adapter, save_adapter
from strata.atomic import write_text
from strata.backbone.load import load_backbone, resolve
from strata.backbone.tiny import RECIPES, build_model
from strata.config import AdapterSpec, BackboneSpec
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table
from strata.eval.plots import save_figure
from strata.registry import Ref, Registry, backbone_info
from strata.serving.host import AdapterHost, Request
from strata.serving.mixed_lora import MixedLoRA

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ADAPTERS = 16


def build(work: Path, quick: bool, console: Console) -> tuple[BackboneSpec, Registry]:
    """A backbone directory built from config, and a registry with 16 LoRA adapters on it."""
    test = resolve(BackboneSpec("builtin:test"))
    _, processor = load_backbone(BackboneSpec("builtin:test"), test)
    recipe = RECIPES["builtin:test"] if quick else replace(RECIPES["builtin:tiny"], width=512, heads=8)
    model = build_model(recipe, processor)
    model.save_pretrained(work / "backbone")
    processor.save_pretrained(work / "backbone")
    spec = BackboneSpec(str(work / "backbone"))
    bare, _ = load_backbone(spec, work / "backbone")
    info = backbone_info(spec.source, work / "backbone", bare)
    reg = Registry(str(work / "registry"))
    for i in range(ADAPTERS):
        fresh, _ = load_backbone(spec, work / "backbone")
        peft = add_adapter(fresh, "a", AdapterSpec(visual_rank=8, text_rank=8))
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        ref = Ref("bench", f"a{i:02d}", 1)
        reg.push(ref, save_adapter(peft, "a", work / f"src{i}"), {"strategy": "bench"}, info)
        reg.promote(ref)
    console.log(f"backbone width {recipe.width}, {ADAPTERS} adapters in {reg.uri}")
    return spec, reg


def timed(fn, repeats: int) -> list[float]:
    """Wall times of `repeats` calls, after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


@torch.no_grad()
def forwards(host: AdapterHost, repeats: int) -> dict:
    """One 32-row batch over 16 adapters: mixed LoRA vs PEFT adapter_names vs per-adapter forwards."""
    names = [host.load(r) for r in host.production()]
    table = generate_task("colour", 0, n_train=0, n_val=0, n_test=32)
    batch = collate(encode_table(host.processor, table, with_answers=False), host.processor.tokenizer.pad_token_id)
    batch.pop("labels")
    rows = [names[i % len(names)] for i in range(32)]
    model, mixed = host.model, MixedLoRA(host.model)

    def ours():
        with mixed.select(rows) as m:
            m(**batch)

    def one_adapter():
        with mixed.select([names[0]] * 32) as m:
            m(**batch)

    def peft_single():
        model.set_adapter(names[0])
        model(**batch)

    def peft_mixed():
        model(**batch, adapter_names=rows)

    def per_adapter():
        for name in names:
            idx = [i for i, r in enumerate(rows) if r == name]
            model.set_adapter(name)
            model(**{k: v[idx] for k, v in batch.items()})

    paths = {"strata_mixed": ours, "strata_one_adapter": one_adapter, "peft_one_adapter": peft_single,
             "peft_adapter_names": peft_mixed, "peft_per_adapter_loop": per_adapter}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(repeats):  # round-robin, so drift on a busy machine hits every path alike
        for k, f in paths.items():
            times[k] += timed(f, 1)
    t = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": t, "mixed_vs_one_adapter_throughput": t["strata_one_adapter"] / t["strata_mixed"],
            "per_adapter_loop_over_mixed": t["peft_per_adapter_loop"] / t["strata_mixed"],
            "peft_adapter_names_over_mixed": t["peft_adapter_names"] / t["strata_mixed"],
            "peft_mixed_vs_one_adapter_throughput": t["peft_one_adapter"] / t["peft_adapter_names"]}


def switches(host: AdapterHost, n: int) -> dict:
    """Latency of 1-token requests alternating between two adapters, against one adapter throughout."""
    row = generate_task("colour", 0, n_train=0, n_val=0, n_test=1).to_pylist()[0]
    a, b = [str(r) for r in host.production()[:2]]

    def latencies(models: list[str]) -> list[float]:
        out = []
        for m in models:
            start = time.perf_counter()
            host.complete([Request(m, row["prompt"], (row["image"],), max_tokens=1)])
            out.append(time.perf_counter() - start)
        return out

    latencies([a, b] * 5)  # warm: both resident, stacks built
    same, alternating = [], []
    for _ in range(n // 20):  # interleaved blocks, so drift hits both alike
        same += latencies([a] * 10)
        alternating += latencies([a, b] * 5)
    same, alternating = np.array(same) * 1e3, np.array(alternating) * 1e3
    names = list(host.resident)
    set_adapter = np.array([timed(lambda name=name: host.model.set_adapter(name), 1)[0]
                            for name in names * (n // len(names))]) * 1e3
    pct = lambda x, q: float(np.percentile(x, q))
    return {"requests": n, "same_p50_ms": pct(same, 50), "same_p99_ms": pct(same, 99),
            "alternating_p50_ms": pct(alternating, 50), "alternating_p99_ms": pct(alternating, 99),
            "switch_cost_p50_ms": pct(alternating, 50) - pct(same, 50),
            "switch_cost_p99_ms": pct(alternating, 99) - pct(same, 99),
            "peft_set_adapter_p50_ms": pct(set_adapter, 50), "peft_set_adapter_p99_ms": pct(set_adapter, 99)}


def cold_load(spec: BackboneSpec, reg: Registry, repeats: int) -> dict:
    """`AdapterHost.load` of a non-resident adapter, then its first 1-token request."""
    host = AdapterHost(reg.uri, spec, capacity=1)
    refs = host.production()
    host.load(refs[0])
    row = generate_task("colour", 0, n_train=0, n_val=0, n_test=1).to_pylist()[0]
    loads, firsts = [], []
    for i in range(repeats):
        ref = refs[1 + i % (len(refs) - 1)]
        start = time.perf_counter()
        host.load(ref)
        loads.append(time.perf_counter() - start)
        start = time.perf_counter()
        host.complete([Request(str(ref), row["prompt"], (row["image"],), max_tokens=1)])
        firsts.append(time.perf_counter() - start)
    return {"load_p50_ms": 1e3 * statistics.median(loads), "first_request_p50_ms": 1e3 * statistics.median(firsts)}


def http(spec: BackboneSpec, reg: Registry, requests: int, console: Console) -> dict:
    """Through the Serve app on loopback: throughput by traffic mix, time to first token, and a hot adapter
    spread over two replicas."""
    import ray
    from ray import serve
    from serve_apps.openai_app import app  # installed with the package

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"registry": reg.uri, "backbone": spec.source, "capacity": ADAPTERS, "max_batch_size": 32}
    serve.run(app({**args, "batch_wait_s": 0.01}), name="strata", route_prefix="/")
    row = generate_task("colour", 0, n_train=0, n_val=0, n_test=1).to_pylist()[0]
    client = Client(port, row)
    ids = [f"bench/a{i:02d}" for i in range(ADAPTERS)]
    rng = np.random.default_rng(0)
    zipf = 1 / np.arange(1, ADAPTERS + 1) ** 1.2
    mixes = {"1 adapter": [ids[0]] * requests, "16 adapters, uniform": [ids[i % ADAPTERS] for i in range(requests)],
             "16 adapters, skewed": list(rng.choice(ids, size=requests, p=zipf / zipf.sum()))}
    out: dict = {"requests_per_s": {}}
    try:
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(client.plain, ids * 2))  # warm: every adapter resident
            for label, models in mixes.items():
                start = time.perf_counter()
                list(pool.map(client.plain, models))
                out["requests_per_s"][label] = requests / (time.perf_counter() - start)
                console.log(f"http {label}: {out['requests_per_s'][label]:.1f} requests/s")
        serve.run(app(args), name="strata", route_prefix="/")  # the default batch window
        out["first_token"] = first_token(client, ids, requests)
        console.log(f"time to first token: {out['first_token']['ttft_vs_full_p50']:.2f} of the full latency (p50)")
        serve.run(app({**args, "replicas": 2}), name="strata", route_prefix="/")
        out["hot_spread"] = hot_spread(client, ids, 2 * requests)
        console.log(f"hot adapter per replica: {out['hot_spread']['hot_share_per_replica']}")
    finally:
        serve.shutdown()
        ray.shutdown()
    h = out["requests_per_s"]
    return {**out, "uniform_vs_one": h["16 adapters, uniform"] / h["1 adapter"],
            "skewed_vs_one": h["16 adapters, skewed"] / h["1 adapter"]}


class Client:
    """HTTP requests to the local app: plain or streamed, with their timings."""

    def __init__(self, port: int, row: dict) -> None:
        self.port, self.row = port, row
        self.image = "data:image/png;base64," + base64.b64encode(row["image"]).decode()

    def body(self, model: str, tokens: int = 8, **extra) -> dict:
        return {"model": model, "max_tokens": tokens, "temperature": 0, **extra, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": self.image}}, {"type": "text", "text": self.row["prompt"]}]}]}

    def plain(self, model: str, tokens: int = 8, **extra) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions",
                                     json.dumps(self.body(model, tokens, **extra)).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as reply:
            return json.loads(reply.read())

    def streamed(self, model: str, tokens: int) -> tuple[float, float, int]:
        """(seconds to the first text, seconds to the end, content events) of one streamed answer."""
        conn = HTTPConnection("127.0.0.1", self.port, timeout=300)
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", json.dumps(self.body(model, tokens, stream=True, ignore_eos=True)),
                     {"Content-Type": "application/json"})
        reply, first, pieces = conn.getresponse(), None, 0
        while line := reply.readline():
            if line.startswith(b"data: [DONE]"):
                break
            if line.startswith(b"data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter() - start
                pieces += 1
        conn.close()
        return first or float("nan"), time.perf_counter() - start, pieces

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/stats", timeout=30) as reply:
            return json.loads(reply.read())


def first_token(client: Client, ids: list[str], requests: int, clients: int = 8, tokens: int = 32) -> dict:
    """Time to first token beside the full latency, streamed and not: 8 clients, 32 tokens forced."""
    def timed_plain(model: str) -> float:
        start = time.perf_counter()
        client.plain(model, tokens, ignore_eos=True)
        return time.perf_counter() - start

    models = [ids[i % ADAPTERS] for i in range(requests)]
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(timed_plain, ids))  # warm
        plain = list(pool.map(timed_plain, models))
        streamed = list(pool.map(lambda m: client.streamed(m, tokens), models))
    pct = lambda xs, q: 1e3 * float(np.percentile(xs, q))
    ttft, full = [s[0] for s in streamed], [s[1] for s in streamed]
    return {"clients": clients, "tokens": tokens, "requests": requests,
            "streamed_ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
            "streamed_full_ms": {"p50": pct(full, 50), "p99": pct(full, 99)},
            "plain_full_ms": {"p50": pct(plain, 50), "p99": pct(plain, 99)},
            "content_events_p50": float(np.median([s[2] for s in streamed])),
            "ttft_vs_full_p50": statistics.median(ttft) / statistics.median(plain)}


def hot_spread(client: Client, ids: list[str], requests: int, clients: int = 16) -> dict:
    """Two replicas, 90% of the traffic on one adapter: how the hot adapter's requests split."""
    deadline = time.monotonic() + 60
    while len(client.stats()["replicas"]) != 2 and time.monotonic() < deadline:  # the old replica's report ages out
        time.sleep(0.5)
    rng = np.random.default_rng(1)
    models = [ids[0] if rng.random() < 0.9 else ids[int(rng.integers(1, ADAPTERS))] for _ in range(requests)]
    errors = 0

    def one(model: str) -> None:
        nonlocal errors
        try:
            client.plain(model)
        except Exception:  # noqa: BLE001 - counted: the bar is no error at all
            errors += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, models))
    time.sleep(2.5)  # every replica's next heartbeat
    hot = f"{ids[0]}@v1"
    per = {r: s["requests"].get(hot, 0) for r, s in client.stats()["replicas"].items()}
    return {"requests": requests, "errors": errors, "hot_requests_per_replica": per,
            "hot_share_per_replica": [round(v / max(1, sum(per.values())), 3) for v in per.values()]}


def report(results: dict, console: Console, out: Path) -> None:
    """Tables in the terminal, JSON and a plot on disk."""
    f = results["forward"]
    t = Table(title="one 32-row batch over 16 adapters (median ms)")
    for col in ("path", "ms", "vs Strata mixed"):
        t.add_column(col, justify="right" if col != "path" else "left")
    for k, v in f["seconds"].items():
        t.add_row(k, f"{1e3 * v:.1f}", f"{v / f['seconds']['strata_mixed']:.2f}x")
    console.print(t)
    s, c = results["switch"], results["cold_load"]
    console.print(f"switch: +{s['switch_cost_p50_ms']:.2f} ms p50, +{s['switch_cost_p99_ms']:.2f} ms p99 over "
                  f"{s['requests']} requests (PEFT set_adapter alone: {s['peft_set_adapter_p50_ms']:.2f} ms p50); "
                  f"cold load {c['load_p50_ms']:.0f} ms, then first request {c['first_request_p50_ms']:.0f} ms")
    if "http" in results:
        h = results["http"]
        t = Table(title="HTTP on loopback, 32 concurrent clients")
        t.add_column("traffic")
        t.add_column("requests/s", justify="right")
        t.add_column("vs 1 adapter", justify="right")
        for k, v in h["requests_per_s"].items():
            t.add_row(k, f"{v:.1f}", f"{v / h['requests_per_s']['1 adapter']:.2f}x")
        console.print(t)
        ft = h["first_token"]
        t = Table(title=f"{ft['clients']} clients, {ft['tokens']} tokens forced (ms)")
        for col in ("", "p50", "p99"):
            t.add_column(col, justify="right" if col else "left")
        for label, key in (("streamed: first token", "streamed_ttft_ms"), ("streamed: last token", "streamed_full_ms"),
                           ("not streamed: answer", "plain_full_ms")):
            t.add_row(label, f"{ft[key]['p50']:.0f}", f"{ft[key]['p99']:.0f}")
        console.print(t)
        console.print(f"first token / full answer (p50): {ft['ttft_vs_full_p50']:.2f} (goal <= 0.3); "
                      f"hot adapter per replica: {h['hot_spread']['hot_share_per_replica']} (goal >= 0.35 each), "
                      f"{h['hot_spread']['errors']} errors")
    write_text(out, json.dumps(results, indent=1))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(list(f["seconds"]), [1e3 * v for v in f["seconds"].values()])
    ax.set_xlabel("ms per 32-row batch (median)")
    ax.set_title("16 adapters in one batch")
    fig.tight_layout()
    save_figure(fig, out.with_suffix(".png"))
    plt.close(fig)
    console.print(f"wrote {out} and {out.with_suffix('.png')}")


def main(argv: list[str] | None = None) -> None:
    """Run every part and write the results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the test backbone and fewer repeats")
    p.add_argument("--switches", type=int, default=1000)
    p.add_argument("--no-http", action="store_true", help="skip the Serve part")
    p.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = p.parse_args(argv)
    console = Console()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="strata-serve-") as tmp:
        spec, reg = build(Path(tmp), args.quick, console)
        host = AdapterHost(reg.uri, spec, capacity=ADAPTERS)
        repeats = 3 if args.quick else 10
        results = {"meta": {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
                            "backbone": "builtin:test" if args.quick else "width 512 (built from config)"},
                   "forward": forwards(host, repeats)}
        console.log("forward done")
        results["switch"] = switches(host, 100 if args.quick else args.switches)
        results["cold_load"] = cold_load(spec, reg, repeats)
        del host
        if not args.no_http:
            results["http"] = http(spec, reg, 64 if args.quick else 256, console)
    report(results, console, args.out)


if __name__ == "__main__":
    main()
