"""A soak with faults: mixed traffic over 16 adapters, promotions and rollbacks, replicas killed, on loopback.

    .venv/bin/python benchmarks/soak.py                       # 20 minutes, 2 replicas, 2 kills
    .venv/bin/python benchmarks/soak.py --duration 60 --change-every 15 --kills 1   # a short one

The test backbone (`builtin:test`) with 16 adapters: 14 with two versions each (v1 in production),
and `colour` and `shape` with router prototypes, so `soak/auto` routes. Client threads send a mix
of unstreamed, streamed, pinned (`@v1`/`@v2`) and `auto` requests; a controller promotes v2 of a
busy adapter and later rolls it back, every `--change-every` seconds; a replica is killed
`--kills` times, evenly spread. It records:
  requests      status counts per kind;
  latency       p50/p99 per 30 s (10 s in a short soak) over time, as a plot;
  wrong version answers from another version than the one due, which must be 0: a pinned request
                must be answered by its version, and an unpinned one sent after a promotion or
                rollback returned by the new production version (requests in flight during a
                change are counted apart). The text is checked too, against the version's own
                greedy answer computed in-process beforehand;
  memory        each replica's RSS over time (from /v1/stats), growth after warm-up;
  recovery      seconds from a kill until the deployment has all its replicas running again.
Writes benchmarks/results/soak.json and soak.png, and prints the tables.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import random
import socket
import tempfile
import threading
import time
from collections import Counter
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
from strata.backbone.features import pooled_features
from strata.backbone.load import load_backbone, resolve
from strata.config import AdapterSpec, BackboneSpec
from strata.data.benchmark import generate_task
from strata.data.collate import encode_table
from strata.eval.plots import save_figure
from strata.registry import Ref, Registry, backbone_info
from strata.routing import ROUTER_FILE, PrototypeRouter
from strata.serving.host import AdapterHost, Request

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
TOKEN = "soak-token"
ROUTED = ("colour", "shape")  # adapters with router prototypes: `auto` picks between them
NAMES = [f"a{i:02d}" for i in range(16 - len(ROUTED))] + list(ROUTED)


def build(work: Path, spec: BackboneSpec) -> tuple[Registry, dict]:
    """The registry (v1 in production, v2 waiting) and every version's greedy answer to the fixed question."""
    path = resolve(spec)
    model, processor = load_backbone(spec, path)
    info = backbone_info(spec.source, path, model)
    reg = Registry(str(work / "registry"))
    prototypes = {}
    for name in ROUTED:
        rows = generate_task(name, 1, n_train=64, n_val=0, n_test=0)
        feats = pooled_features(model, processor, encode_table(processor, rows, with_answers=False))
        prototypes[name] = PrototypeRouter.of(name, feats).save(work / f"proto-{name}")
    for i, name in enumerate(NAMES):
        for version in (1, 2):
            peft = add_adapter(load_backbone(spec, path)[0], "a", AdapterSpec(visual_rank=2, text_rank=4))
            torch.manual_seed(100 * i + version)
            with torch.no_grad():
                for n, p in peft.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.05)
            side = {ROUTER_FILE: prototypes[name]} if name in prototypes else {}
            reg.push(Ref("soak", name, version), save_adapter(peft, "a", work / f"{name}-v{version}"),
                     {"strategy": "soak"}, info, side=side)
        reg.promote(Ref("soak", name, 1))
    host = AdapterHost(reg.uri, spec, capacity=32)
    row = question()
    refs = [Ref("soak", n, v) for n in NAMES for v in (1, 2)]
    done = host.complete([Request(str(r), row["prompt"], (row["image"],), max_tokens=6) for r in refs])
    return reg, {str(r): c.text for r, c in zip(refs, done)}


def question() -> dict:
    return generate_task("colour", 0, n_train=0, n_val=0, n_test=1).to_pylist()[0]


class Log:
    """Every request's outcome, and every change to production, thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.changes: list[dict] = []  # adapter, version now in production, started, returned

    def add(self, **record) -> None:
        with self.lock:
            self.requests.append(record)


def send(port: int, body: dict, stream: bool) -> tuple[int, str, str]:
    """(status, the answer's text, the model that answered) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": stream}),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
        reply = conn.getresponse()
        if not stream or reply.status != 200:
            data = json.loads(reply.read())
            return (reply.status, data["choices"][0]["message"]["content"], data["model"]) if reply.status == 200 \
                else (reply.status, "", "")
        text, model = [], ""
        while line := reply.readline():
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return 599, "", ""  # failed after its first byte
            if event["choices"]:
                text.append(event["choices"][0]["delta"].get("content") or "")
                model = event["model"]
        return 200, "".join(text), model
    except (OSError, http.client.HTTPException):
        return 598, "", ""  # the connection broke
    finally:
        conn.close()


def client(port: int, log: Log, stop: threading.Event, seed: int) -> None:
    """One client's loop: a random kind of request to a skewed choice of adapter."""
    rng = random.Random(seed)
    row = question()
    image = "data:image/png;base64," + base64.b64encode(row["image"]).decode()
    weights = [1 / (i + 1) for i in range(len(NAMES))]
    while not stop.is_set():
        kind = rng.choices(["plain", "streamed", "pinned", "auto"], [0.4, 0.25, 0.2, 0.15])[0]
        name = rng.choices(NAMES, weights)[0]
        model = {"pinned": f"soak/{name}@v{rng.choice((1, 2))}", "auto": "soak/auto"}.get(kind, f"soak/{name}")
        body = {"model": model, "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": row["prompt"]}]}]}
        sent = time.monotonic()
        status, text, answered = send(port, body, kind == "streamed")
        log.add(kind=kind, model=model, sent=sent, done=time.monotonic(), status=status, text=text, answered=answered)


def controller(reg: Registry, log: Log, stop: threading.Event, every: float) -> None:
    """Promote v2 of a busy adapter, and roll it back next time, every `every` seconds."""
    busy = NAMES[:4]
    step = 0
    while not stop.wait(every):
        name = busy[(step // 2) % len(busy)]
        started = time.monotonic()
        if step % 2 == 0:
            reg.promote(Ref("soak", name, 2))
        else:
            reg.rollback("soak", name)
        log.changes.append({"adapter": name, "version": reg.production("soak", name), "started": started,
                            "returned": time.monotonic()})
        step += 1


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("strata")
    return app.deployments["AdapterServer"].replica_states.get("RUNNING", 0) if app else 0


def kill_one(replicas: int) -> float:
    """Kill one AdapterServer replica; seconds until the deployment runs `replicas` again."""
    import ray

    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if "AdapterServer" in a["name"]]
    victim = actors[0]
    started = time.monotonic()
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    while running_replicas() >= replicas and time.monotonic() - started < 30:  # Serve notices the death first
        time.sleep(0.2)
    while running_replicas() < replicas:
        time.sleep(0.2)
    return time.monotonic() - started


def sampler(port: int, memory: list[dict], stop: threading.Event, every: float = 5.0) -> None:
    """Each live replica's RSS, from /v1/stats, every few seconds."""
    while not stop.wait(every):
        try:
            req = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            req.request("GET", "/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"})
            replicas = json.loads(req.getresponse().read())["replicas"]
            req.close()
        except (OSError, ValueError, http.client.HTTPException):
            continue
        now = time.monotonic()
        memory += [{"t": now, "replica": r, "rss_mb": s["rss_mb"]} for r, s in replicas.items()]


def production_at(changes: list[dict], adapter: str, t: float) -> int:
    version = 1
    for c in changes:
        if c["adapter"] == adapter and c["returned"] < t:
            version = c["version"]
    return version


def verify(log: Log, expected: dict) -> dict:
    """Answers from the wrong version: the reply's model, and its text against that version's own answer."""
    wrong_model, wrong_text, during_change, checked = [], [], 0, 0
    for r in log.requests:
        if r["status"] != 200:
            continue
        if r["kind"] == "pinned":
            due = r["model"]
        else:
            adapter = r["answered"].split("@")[0].split("/")[-1] if r["kind"] == "auto" else r["model"].split("/")[-1]
            if any(c["adapter"] == adapter and c["started"] <= r["done"] and c["returned"] >= r["sent"]
                   for c in log.changes):
                during_change += 1  # either version is right
                continue
            due = f"soak/{adapter}@v{production_at(log.changes, adapter, r['sent'])}"
        checked += 1
        if r["answered"] != due:
            wrong_model.append({k: r[k] for k in ("kind", "model", "answered")} | {"due": due})
        elif r["text"] != expected[due]:
            wrong_text.append({k: r[k] for k in ("kind", "model", "text")} | {"due": expected[due]})
    return {"checked": checked, "during_change": during_change, "wrong_version": len(wrong_model),
            "wrong_text": len(wrong_text), "examples": (wrong_model + wrong_text)[:5]}


def summarise(log: Log, memory: list[dict], start: float, recoveries: list[float], warmup: float,
              bucket_s: float) -> dict:
    statuses = Counter(f"{r['kind']} {r['status']}" for r in log.requests)
    buckets: dict[int, list[float]] = {}
    for r in log.requests:
        if r["status"] == 200:
            buckets.setdefault(int((r["sent"] - start) // bucket_s), []).append(r["done"] - r["sent"])
    latency = [{"t_s": bucket_s * b, "p50_ms": 1e3 * float(np.percentile(v, 50)), "p99_ms": 1e3 * float(np.percentile(v, 99)),
                "n": len(v)} for b, v in sorted(buckets.items())]
    growth = {}
    for replica in {m["replica"] for m in memory}:
        seen = [m for m in memory if m["replica"] == replica]
        after = [m["rss_mb"] for m in seen if m["t"] - seen[0]["t"] >= warmup]
        if len(after) >= 2:
            growth[replica] = {"after_warmup_mb": after[0], "max_mb": max(after), "growth": max(after) / after[0] - 1}
    ok = [r["done"] - r["sent"] for r in log.requests if r["status"] == 200]
    return {"requests": len(log.requests), "statuses": dict(sorted(statuses.items())),
            "ok_share": len(ok) / max(1, len(log.requests)),
            "latency_p50_ms": 1e3 * float(np.percentile(ok, 50)) if ok else None,
            "latency_p99_ms": 1e3 * float(np.percentile(ok, 99)) if ok else None,
            "latency_over_time": latency, "rss_growth_after_warmup": growth,
            "failures": [{"t": r["sent"] - start, "kind": r["kind"], "status": r["status"]}
                         for r in log.requests if r["status"] != 200],
            "memory": [{**m, "t": m["t"] - start} for m in memory], "recovery_s": recoveries,
            "changes": [{**c, "started": c["started"] - start, "returned": c["returned"] - start} for c in log.changes]}


def soak(args: argparse.Namespace, console: Console) -> dict:
    """Run the soak and return its figures."""
    import ray
    from ray import serve
    from serve_apps.openai_app import app

    spec = BackboneSpec("builtin:test")
    with tempfile.TemporaryDirectory(prefix="strata-soak-") as tmp:
        reg, expected = build(Path(tmp), spec)
        console.log(f"{len(NAMES)} adapters, two versions each; every version's answer computed in-process")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app({"registry": reg.uri, "backbone": spec.source, "capacity": 8, "token": TOKEN,
                       "replicas": args.replicas}), name="strata", route_prefix="/")
        log, memory, stop = Log(), [], threading.Event()
        threads = [threading.Thread(target=client, args=(port, log, stop, i)) for i in range(args.clients)]
        threads += [threading.Thread(target=controller, args=(reg, log, stop, args.change_every)),
                    threading.Thread(target=sampler, args=(port, memory, stop))]
        start = time.monotonic()
        for t in threads:
            t.start()
        recoveries, kills = [], []
        try:
            for k in range(args.kills):
                time.sleep(max(0.0, start + args.duration * (k + 1) / (args.kills + 1) - time.monotonic()))
                kills.append(time.monotonic() - start)
                recoveries.append(kill_one(args.replicas))
                console.log(f"replica killed; all {args.replicas} running again after {recoveries[-1]:.1f} s")
            while (left := start + args.duration - time.monotonic()) > 0:
                time.sleep(min(left, 30))
                console.log(f"{time.monotonic() - start:.0f} s: {len(log.requests)} requests, "
                            f"{len(log.changes)} promotions/rollbacks")
        finally:
            stop.set()
            for t in threads:
                t.join()
            serve.shutdown()
            ray.shutdown()
        bucket = 30.0 if args.duration >= 600 else 10.0
        return {**summarise(log, memory, start, recoveries, args.warmup, bucket), "kills_s": kills,
                **verify(log, expected)}


def report(results: dict, console: Console, out: Path) -> None:
    """Tables in the terminal, JSON and a plot on disk."""
    t = Table(title=f"soak: {results['duration_s']:.0f} s, {results['requests']} requests")
    t.add_column("kind and status")
    t.add_column("requests", justify="right")
    for k, v in results["statuses"].items():
        t.add_row(k, str(v))
    console.print(t)
    growth = {r: f"{100 * g['growth']:+.1f}%" for r, g in results["rss_growth_after_warmup"].items()}
    console.print(f"wrong version: {results['wrong_version']} (text: {results['wrong_text']}) of {results['checked']} "
                  f"checked, {results['during_change']} in flight during a change; latency p50 "
                  f"{results['latency_p50_ms']:.0f} ms, p99 {results['latency_p99_ms']:.0f} ms; recovery "
                  f"{[round(r, 1) for r in results['recovery_s']]} s; RSS after warm-up {growth}")
    write_text(out, json.dumps(results, indent=1))
    fig, (lat, mem) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    over = results["latency_over_time"]
    lat.plot([b["t_s"] for b in over], [b["p50_ms"] for b in over], label="p50")
    lat.plot([b["t_s"] for b in over], [b["p99_ms"] for b in over], label="p99")
    for c in results["changes"]:
        lat.axvline(c["returned"], color="grey", lw=0.5)
    for k in results["kills_s"]:
        for ax in (lat, mem):
            ax.axvline(k, color="red", lw=1)
    lat.set_ylabel("latency (ms)")
    lat.legend()
    for replica in sorted({m["replica"] for m in results["memory"]}):
        seen = [m for m in results["memory"] if m["replica"] == replica]
        mem.plot([m["t"] for m in seen], [m["rss_mb"] for m in seen], label=replica)
    mem.set_ylabel("replica RSS (MB)")
    mem.set_xlabel("seconds (grey: promotions and rollbacks; red: a replica killed)")
    fig.tight_layout()
    save_figure(fig, out.with_suffix(".png"))
    plt.close(fig)
    console.print(f"wrote {out} and {out.with_suffix('.png')}")


def main(argv: list[str] | None = None) -> dict:
    """Run the soak, print and save its results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=1200.0, help="seconds of traffic")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--change-every", type=float, default=120.0, help="seconds between promotions and rollbacks")
    p.add_argument("--kills", type=int, default=2)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--warmup", type=float, default=120.0, help="seconds of a replica's life before RSS is compared")
    p.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = p.parse_args(argv)
    console = Console()
    results = soak(args, console)
    results = {"meta": {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU", **vars(args),
                        "out": str(args.out)}, "duration_s": args.duration, **results}
    report(results, console, args.out)
    return results


if __name__ == "__main__":
    main()
