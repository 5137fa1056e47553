"""`strata registry ls|show|promote|rollback|diff|gc`: the registry from the terminal, as tables."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import wraps

import typer
from rich.table import Table

from strata.registry.store import Ref, Registry, RegistryError, parse_id
from strata.terminal import console, fail

registry_app = typer.Typer(help="The adapter registry: versions, stages, promotion, rollback.", no_args_is_help=True)
REGISTRY = typer.Option("runs/stream/registry", "--registry", envvar="STRATA_REGISTRY",
                        help="Registry root: a directory or pyarrow.fs URI (env STRATA_REGISTRY).")
STREAM = typer.Option("default", help="Stream of an adapter id given without one.")


def friendly(command: Callable) -> Callable:
    """Turn the registry's refusals into a clear one-line error and exit code 1."""
    @wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (RegistryError, ValueError, FileNotFoundError) as e:
            fail(str(e))
    return run


def ref_of(registry: Registry, adapter_id: str, stream: str, default: str = "production") -> Ref:
    """The version an id names; without `@v<N>`, the `default` one (production or latest)."""
    s, adapter, version = parse_id(adapter_id, stream)
    if not registry.versions(s, adapter):
        raise RegistryError(f"no adapter {s}/{adapter} in registry {registry.uri}")
    return registry.resolve(s, adapter, version or default)


@registry_app.command("ls")
@friendly
def ls(registry: str = REGISTRY, stream: str | None = typer.Option(None, help="Only this stream.")) -> None:
    """Every adapter with its versions, production version and stage counts."""
    reg = Registry(registry)
    table = Table(title=f"registry {registry}")
    for col in ("stream", "adapter", "versions", "production", "rejected", "archived", "latest"):
        table.add_column(col, justify="right" if col not in ("stream", "adapter") else "left")
    for s in [stream] if stream else reg.streams():
        for adapter in reg.adapters(s):
            versions = reg.versions(s, adapter)
            stages = [reg.card(Ref(s, adapter, v))["stage"] for v in versions]
            prod = reg.production(s, adapter)
            table.add_row(s, adapter, str(len(versions)), f"v{prod}" if prod else "—",
                          str(stages.count("rejected")), str(stages.count("archived")),
                          f"v{versions[-1]} ({stages[-1]})" if versions else "—")
    console.print(table)


@registry_app.command("show")
@friendly
def show(adapter_id: str = typer.Argument(..., help="<stream>/<adapter>[@v<N>] (default: production, else latest)."),
         registry: str = REGISTRY, stream: str = STREAM,
         as_json: bool = typer.Option(False, "--json", help="Print the whole card as JSON.")) -> None:
    """One version's card: stage, lineage, hashes, gate verdict, metrics and history."""
    reg = Registry(registry)
    s, adapter, _ = parse_id(adapter_id, stream)
    default = "production" if reg.production(s, adapter) else "latest"
    card = reg.card(ref_of(reg, adapter_id, stream, default))
    if as_json:
        console.print_json(json.dumps(card))
        return
    table = Table(title=f"{s}/{adapter}@v{card['version']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    gate = card.get("gate") or {}
    rows = {
        "stage": card["stage"],
        "created": when(card["created"]),
        "strategy / task": f"{card.get('strategy')} / {card.get('task')}",
        "parent": f"v{card['parent']}" if card.get("parent") else "—",
        "backbone": f"{card['backbone']['source']} ({card['backbone']['fingerprint']})",
        "config hash": str(card.get("config_hash")),
        "files": "\n".join(f"{n}  {h['sha256'][:12]}…  {h['bytes']} B" for n, h in card["files"].items()),
        "gate": ("passed" if gate.get("passed") else "failed") if gate else "not run",
        "reasons": "\n".join(card.get("reasons") or gate.get("reasons") or []) or "—",
        "val accuracy": fmt(card.get("metrics", {}).get("val_accuracy")),
        "test accuracy": fmt(card.get("metrics", {}).get("test_accuracy")),
        "KL to served": f"{gate['kl']:.3f} (threshold {gate.get('kl_threshold')})" if gate.get("kl") is not None
        else "—",
        "history": "\n".join(f"{when(h['time'])}  {h['stage']}: {h['reason']}" for h in card["history"]),
    }
    for k, v in rows.items():
        table.add_row(k, v)
    console.print(table)


@registry_app.command("promote")
@friendly
def promote(adapter_id: str = typer.Argument(..., help="<stream>/<adapter>@v<N>"), registry: str = REGISTRY,
            stream: str = STREAM, force: bool = typer.Option(False, help="Promote even a version the gate rejected.")) -> None:
    """Serve a version: point `production` at it and archive the one it replaces."""
    ref = promote_version(Registry(registry), adapter_id, stream, force)
    console.print(f"[green]production[/] {ref.stream}/{ref.adapter} -> v{ref.version}")


def promote_version(reg: Registry, adapter_id: str, stream: str, force: bool = False, by: str = "") -> Ref:
    """Point `production` at an exact version (the CLI's and the console's promote); the version."""
    if parse_id(adapter_id, stream)[2] is None:
        raise RegistryError(f"promote needs a version: {adapter_id}@v<N>")
    ref = ref_of(reg, adapter_id, stream)
    reg.promote(ref, "promoted by hand" + (f" from {by}" if by else "") + (" (forced)" if force else ""), force=force)
    return ref


@registry_app.command("rollback")
@friendly
def rollback(adapter_id: str = typer.Argument(..., help="<stream>/<adapter>"), registry: str = REGISTRY,
             stream: str = STREAM, to: int | None = typer.Option(None, help="Version to serve (default: the previous production).")) -> None:
    """Serve the previous production version again (or `--to N`)."""
    before, ref = rollback_version(Registry(registry), adapter_id, stream, to)
    console.print(f"[green]rolled back[/] {ref.stream}/{ref.adapter}: v{before} -> v{ref.version}")


def rollback_version(reg: Registry, adapter_id: str, stream: str, to: int | None = None) -> tuple[int | None, Ref]:
    """Serve the previous production version again, or `to` (the CLI's and the console's roll back)."""
    s, adapter, _ = parse_id(adapter_id, stream)
    before = reg.production(s, adapter)
    return before, reg.rollback(s, adapter, to)


@registry_app.command("diff")
@friendly
def diff(a: str = typer.Argument(..., help="<stream>/<adapter>@v<N>"), b: str = typer.Argument(..., help="another version"),
         registry: str = REGISTRY, stream: str = STREAM) -> None:
    """Compare two versions' metrics task by task (val and test accuracy), and their drift and gate."""
    reg = Registry(registry)
    refs = [ref_of(reg, x, stream, "latest") for x in (a, b)]
    names = [f"{r.adapter}@v{r.version}" for r in refs]
    table = Table(title=f"{names[0]} vs {names[1]}")
    for col in ("metric", *names, "Δ"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for row in version_rows(reg, *refs):
        table.add_row(*row)
    console.print(table)


def version_rows(reg: Registry, a: Ref, b: Ref) -> list[tuple[str, str, str, str]]:
    """Two versions side by side: (metric, a, b, Δ) per task's val and test accuracy, KL to served, stage."""
    cards = [reg.card(r) for r in (a, b)]
    rows = []
    for split in ("val_accuracy", "test_accuracy"):
        values = [c.get("metrics", {}).get(split) or {} for c in cards]
        for task in dict.fromkeys([*values[0], *values[1]]):
            rows.append((f"{split.split('_')[0]} {task}", *delta(values[0].get(task), values[1].get(task))))
    kls = [(c.get("gate") or {}).get("kl") for c in cards]
    rows.append(("KL to served", *delta(*kls, digits=3)))
    rows.append(("stage", cards[0]["stage"], cards[1]["stage"], ""))
    return rows


@registry_app.command("gc")
@friendly
def gc(adapter_id: str = typer.Argument(..., help="<stream>/<adapter>"), registry: str = REGISTRY, stream: str = STREAM,
       keep: int = typer.Option(3, help="Archived versions to keep (newest first)."),
       grace: float = typer.Option(3600.0, help="Seconds before an unfinished push counts as abandoned.")) -> None:
    """Delete archived versions beyond the newest `keep`, and abandoned unfinished pushes; never production."""
    s, adapter, _ = parse_id(adapter_id, stream)
    removed = Registry(registry).gc(s, adapter, keep, grace)
    console.print(f"removed {', '.join(removed)}" if removed else "nothing to remove")


def when(t: float) -> str:
    """A timestamp as local time."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def fmt(accuracy: dict | None) -> str:
    """Per-task accuracies on one line."""
    return "  ".join(f"{t} {v:.1f}" for t, v in accuracy.items()) if accuracy else "—"


def delta(x: float | None, y: float | None, digits: int = 1) -> tuple[str, str, str]:
    """Two values and their difference, as table cells ('—' where missing)."""
    cell = [f"{v:.{digits}f}" if v is not None else "—" for v in (x, y)]
    return (*cell, f"{y - x:+.{digits}f}" if x is not None and y is not None else "")
