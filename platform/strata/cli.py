"""The `strata` command."""

from __future__ import annotations

import json
from pathlib import Path

import typer
import yaml
from rich.table import Table

from strata import strategies as strategy_registry
from strata.config import RunConfig, smoke_test
from strata.registry.commands import REGISTRY, registry_app
from strata.terminal import console, fail

app = typer.Typer(help="Strata: continual instruction tuning of vision-language models on Ray.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Datasets: validate, import, generate.", no_args_is_help=True)
app.add_typer(data_app, name="data")
adapters_app = typer.Typer(help="Adapters: kinds and placements, merge for deployment.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
probe_app = typer.Typer(help="Diagnostics that look inside training.", no_args_is_help=True)
app.add_typer(probe_app, name="probe")
coordinator_app = typer.Typer(help="A stream's coordinator state: timeline, release.", no_args_is_help=True)
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(registry_app, name="registry")
monitor_app = typer.Typer(help="Watch served adapters: KL drift against an anchor.", no_args_is_help=True)
app.add_typer(monitor_app, name="monitor")
backbone_app = typer.Typer(help="Backbones: build a built-in one, inspect any.", no_args_is_help=True)
app.add_typer(backbone_app, name="backbone")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", help="Also print Ray's and the libraries' logs.")) -> None:
    """Every command is quiet by default (strata/quiet.py); `--verbose` keeps the libraries' output."""
    from strata import quiet

    quiet.setup(verbose)


def build_run_config(
    config: Path | None, strategies: list[str], tasks: int | None, steps: int | None,
    out: str | None, seed: int | None, backbone: str | None, workers: int | None,
    data: str | None, test_rows: int | None, executor: str | None = None, stream: str | None = None,
    gate: str | None = None, registry: str | None = None,
) -> RunConfig:
    """YAML (if given) first, then flags on top; validation happens in the dataclasses."""
    raw: dict = yaml.safe_load(config.read_text()) or {} if config else {}
    flags = {"tasks": tasks, "out": out, "seed": seed, "data": data, "n_test": test_rows, "stream": stream,
             "registry": registry}
    raw.update({k: v for k, v in flags.items() if v is not None})
    if gate is not None:
        raw.setdefault("gate", {})["mode"] = gate
    if strategies:
        raw["strategies"] = list(strategies)
    if backbone:
        raw.setdefault("backbone", {})["source"] = backbone
    train = raw.setdefault("train", {})
    if steps is not None:
        train["steps"] = steps
    if workers is not None:
        train["num_workers"] = workers
    if executor is not None:
        train["executor"] = executor
    if seed is not None:
        train.setdefault("seed", seed)
    return strategy_registry.run_config(raw, "run config")


GATE = typer.Option(None, help="Promotion gate: enforce (reject failing candidates, the default) or report "
                                "(record the verdict, promote anyway: benchmark mode).")


@app.command()
def run(
    strategy: list[str] = typer.Option([], "--strategy", "-s", help=(
        f"Strategy to run; repeat for several. One of: {', '.join(strategy_registry.names())} "
        "(their options: `strata strategies`).")),
    tasks: int | None = typer.Option(None, help="How many tasks of the stream to learn."),
    steps: int | None = typer.Option(None, help="Most optimizer steps per task (early stopping on val usually ends sooner)."),
    out: str | None = typer.Option(None, help="Output directory."),
    seed: int | None = typer.Option(None, help="Seed for data, init and sampling."),
    backbone: str | None = typer.Option(None, help="builtin:tiny, builtin:test, or a local model dir."),
    workers: int | None = typer.Option(None, help="Ray Train workers per task."),
    data: str | None = typer.Option(None, help="Directory of <task>.parquet (default: built-in)."),
    test_rows: int | None = typer.Option(None, help="Test rows per built-in task."),
    config: Path | None = typer.Option(None, help="YAML file that fills the run config."),
    executor: str | None = typer.Option(None, help="ray (Ray Train workers) or local (this process)."),
    gate: str | None = GATE,
    registry: str | None = typer.Option(None, help="Registry root (default <out>/registry)."),
    smoke: bool = typer.Option(False, "--smoke-test", help="The same run, small: test backbone, 2 tasks, 60 steps."),
    verbose: bool = typer.Option(False, "--verbose", help="Also print Ray's, Ray Train's and the libraries' logs."),
) -> None:
    """Learn a stream of tasks with each strategy and compare forgetting."""
    from strata import quiet

    quiet.setup(verbose)  # before the libraries are imported: some log when imported
    from strata.coordinator import TaskBusy
    from strata.data.schema import DatasetError
    from strata.pipeline import run as run_pipeline

    try:
        cfg = build_run_config(
            config, strategy, tasks, steps, out, seed, backbone, workers, data, test_rows, executor,
            gate=gate, registry=registry,
        )
        run_pipeline(smoke_test(cfg) if smoke else cfg, console)
    except TaskBusy as e:
        fail(str(e))
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, DatasetError):
            console.print(e.report.format())
        fail(str(e).splitlines()[0] if isinstance(e, DatasetError) else str(e))


@app.command("strategies")
def list_strategies(markdown: bool = typer.Option(False, help="Print the README's Markdown table instead.")) -> None:
    """List every registered strategy with its options and their defaults (set them in the run config)."""
    if markdown:
        print(strategy_registry.options_table(strategy_registry.builtin()))
        return
    table = Table(title="strategies (options go in the run config under the strategy's name)")
    for col in ("strategy", "what it is", "options (default)"):
        table.add_column(col)
    for e in strategy_registry.load_all():
        table.add_row(e.name, e.summary, "\n".join(f"{key} ({value})" for key, value in e.option_keys()) or "—")
    console.print(table)


STREAM_OUT = typer.Option("runs/stream", help="The stream's directory (data, state, versions).")
STREAM_NAME = typer.Option("default", help="Stream name (names its coordinator).")


def stream_config(config: Path | None, out: str, stream: str, backbone: str | None, steps: int | None,
                  workers: int | None, executor: str | None, gate: str | None = None) -> RunConfig:
    """The run config of an open stream job (`arrive`, `evaluate`)."""
    return build_run_config(config, [], None, steps, out, None, backbone, workers, None, None, executor, stream,
                            gate=gate)


@app.command()
def arrive(
    task: str = typer.Option(..., help="Name of the arriving task."),
    dataset: Path = typer.Option(..., help="Its Parquet dataset (train, val and test splits)."),
    strategy: str = typer.Option("decoupled", help="The strategy that learns the stream."),
    out: str = STREAM_OUT,
    stream: str = STREAM_NAME,
    config: Path | None = typer.Option(None, help="YAML file that fills the run config."),
    backbone: str | None = typer.Option(None, help="builtin:tiny, builtin:test, or a local model dir."),
    steps: int | None = typer.Option(None, help="Optimizer steps."),
    workers: int | None = typer.Option(None, help="Ray Train workers."),
    executor: str | None = typer.Option(None, help="ray (Ray Train workers) or local (this process)."),
    gate: str | None = GATE,
) -> None:
    """One new task: validate its dataset, train, gate it against what is served, and record it."""
    from strata.coordinator import TaskBusy
    from strata.data.schema import DatasetError
    from strata.open_stream import arrive as arrive_task

    try:
        cfg = stream_config(config, out, stream, backbone, steps, workers, executor, gate)
        arrive_task(cfg, strategy, task, dataset, console)
    except DatasetError as e:
        console.print(e.report.format())
        fail(f"dataset {dataset} for task {task!r} is invalid; nothing was trained or recorded")
    except (ValueError, FileNotFoundError, TaskBusy) as e:
        fail(str(e))


@app.command()
def evaluate(
    strategy: str = typer.Option("decoupled", help="The strategy whose adapters to evaluate."),
    version: int | None = typer.Option(None, help="Version of the shared adapter (default: the latest)."),
    out: str = STREAM_OUT,
    stream: str = STREAM_NAME,
    config: Path | None = typer.Option(None, help="YAML file that fills the run config."),
    backbone: str | None = typer.Option(None, help="builtin:tiny, builtin:test, or a local model dir."),
) -> None:
    """Re-evaluate a version of a strategy's adapters on every arrived task's test rows."""
    from strata.open_stream import evaluate as evaluate_stream

    try:
        evaluate_stream(stream_config(config, out, stream, backbone, None, None, None), strategy, version, console)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))


@app.command()
def tune(space: Path = typer.Argument(..., help="A sweep YAML, e.g. tune_spaces/dgg.yaml."),
         out: str | None = typer.Option(None, help="Where trials and the summary go (default: the YAML's out)."),
         num_samples: int | None = typer.Option(None, help="Samples of the space (default: the YAML's)."),
         scheduler: str | None = typer.Option(None, help="asha or fifo (default: the YAML's)."),
         max_concurrent_trials: int | None = typer.Option(None, help="Trials at once (default: the YAML's)."),
         cpus_per_trial: float | None = typer.Option(None, help="CPUs per trial (default: the YAML's)."),
         gpus_per_trial: float | None = typer.Option(None, help="GPUs per trial (default: the YAML's).")) -> None:
    """Launch a Ray Tune sweep: each trial learns the stream and reports after every task."""
    import dataclasses

    from strata.tune import load_sweep, sweep_run, with_options

    try:
        sweep = with_options(load_sweep(space), {
            "num_samples": num_samples, "scheduler": scheduler, "max_concurrent_trials": max_concurrent_trials,
            "cpus_per_trial": cpus_per_trial, "gpus_per_trial": gpus_per_trial})
        if out is not None:
            sweep = dataclasses.replace(sweep, out=out)
        grid = sweep_run(sweep, console)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if grid.num_errors == len(grid):
        fail(f"every trial of sweep {sweep.name!r} failed; first error: {grid.errors[0]}")


def stream_coordinator(stream: str, out: str, storage: str | None):
    """The stream's coordinator: through its actor inside a Ray cluster (RAY_ADDRESS), else its file."""
    import os

    from strata.coordinator import Coordinator, default_storage

    if os.environ.get("RAY_ADDRESS"):
        from strata.train.driver import init_ray  # Ray Train and torch: seconds of imports, only for the actor

        init_ray()
    return Coordinator(stream, default_storage(out, storage),
                       use_ray=bool(os.environ.get("RAY_ADDRESS")))


@coordinator_app.command("show")
def coordinator_show(stream: str = STREAM_NAME, out: str = STREAM_OUT,
                     storage: str | None = typer.Option(None, help="Coordinator storage (default <out>/coordinator).")) -> None:
    """Print a stream's task timeline per strategy, as the coordinator recorded it."""
    state = stream_coordinator(stream, out, storage).snapshot()
    table = Table(title=f"stream {stream}")
    for col in ("strategy", "task", "status", "attempt", "version", "owner"):
        table.add_column(col)
    for name, st in state["strategies"].items():
        for e in st["timeline"]:
            table.add_row(name, e["task"], e["status"], str(e["attempt"]), str(e.get("version", "—")), e["owner"])
    console.print(table)


@coordinator_app.command("release")
def coordinator_release(stream: str, strategy: str, task: str, out: str = STREAM_OUT,
                        storage: str | None = typer.Option(None, help="Coordinator storage (default <out>/coordinator).")) -> None:
    """Mark a task left `training` by a job that died as failed, so it can be trained again."""
    try:
        entry = stream_coordinator(stream, out, storage).release(strategy, task)
    except (KeyError, ValueError) as e:
        fail(str(e))
    console.print(f"{stream}/{strategy}/{task}: {entry['status']}")


@data_app.command("validate")
def data_validate(path: Path) -> None:
    """Check a dataset against the schema; exit 1 with a row-by-row report if it is bad."""
    from strata.data.schema import validate_dataset

    try:
        report = validate_dataset(path)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if report.ok:
        console.print(f"[green]ok[/]: {path} ({report.num_rows} rows)")
        return
    table = Table(title=f"{path}: {len(report.problems)} problem(s)")
    for col in ("row", "id", "field", "reason"):
        table.add_column(col)
    for p in report.problems[:200]:
        table.add_row("—" if p.row is None else str(p.row), p.id or "—", p.field, p.reason)
    console.print(table)
    fail(f"{path} is not a valid dataset ({len(report.problems)} problem(s))")


@data_app.command("import-llava")
def data_import_llava(
    json_path: Path, image_dir: Path, out: Path,
    split: str = typer.Option("train", help="Split for every row when no fractions are given."),
    val_fraction: float = typer.Option(0.0, help="Share of conversations sent to val."),
    test_fraction: float = typer.Option(0.0, help="Share of conversations sent to test."),
) -> None:
    """Convert LLaVA conversation JSON into Strata's Parquet schema (one row per answer turn)."""
    from strata.data.llava_import import import_llava
    from strata.data.schema import DatasetError

    try:
        summary = import_llava(json_path, image_dir, out, split=split,
                               val_fraction=val_fraction, test_fraction=test_fraction)
    except DatasetError as e:
        console.print(e.report.format())
        fail(f"the converted rows are not valid; nothing was written to {out}")
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    console.print(f"[green]wrote[/] {summary.rows} rows from {summary.records} conversations to {out} "
                  f"({json.dumps(summary.rows_per_split)})")
    for s in summary.skipped:
        console.print(f"[yellow]skipped[/] record {s.index} ({s.id}): {s.reason}")


@data_app.command("generate")
def data_generate(out: Path, seed: int = 0, tasks: int = 8, test_rows: int = 500) -> None:
    """Write the built-in benchmark stream as Parquet (one file per task)."""
    from strata.data.benchmark import TASKS, write_benchmark

    files = write_benchmark(out, seed, TASKS[:tasks], n_test=test_rows)
    for task, path in files.items():
        console.print(f"{task}: {path}")



@backbone_app.command("build")
def backbone_build(name: str = typer.Argument(..., help="A built-in backbone, e.g. builtin:tiny.")) -> None:
    """Build a built-in backbone into the cache now (a no-op when it is cached), e.g. before `make run`."""
    from strata.backbone.tiny import RECIPES, ensure_builtin

    if name not in RECIPES:
        fail(f"unknown built-in backbone {name!r}; expected one of {sorted(RECIPES)}")
    total = RECIPES[name].total_steps
    path = ensure_builtin(name, lambda s, loss: console.print(f"step {s}/{total}, loss {loss:.3f}") if s % 250 == 0 else None)
    console.print(f"ready: {path}")


@backbone_app.command("inspect")
def backbone_inspect(
    source: str = typer.Argument(..., help="builtin:NAME, a local model directory, or a hub id."),
    config: Path | None = typer.Option(None, help="YAML run config whose `adapter` is inspected (default: the "
                                       "default adapter)."),
    kind: str | None = typer.Option(None, help="Override adapter.kind."),
    placement: str | None = typer.Option(None, help="Override adapter.placement."),
) -> None:
    """Print a backbone's family, its parts, where the configured adapter lands, and whether QLoRA applies."""
    import dataclasses

    from strata.backbone.inspect import inspect_backbone
    from strata.backbone.load import resolve
    from strata.config import BackboneSpec

    try:
        spec = build_run_config(config, [], None, None, None, None, None, None, None, None).adapter
        spec = dataclasses.replace(spec, **{k: v for k, v in {"kind": kind, "placement": placement}.items() if v})
        found = inspect_backbone(source, resolve(BackboneSpec(source)), spec)
    except (ValueError, OSError) as e:
        fail(str(e))
    console.print(f"[bold]{source}[/]: family [bold]{found.family.name}[/] ({found.model_class})")
    if found.family.note:
        console.print(f"note: {found.family.note}")
    for refused, why in found.family.refused_kinds.items():
        console.print(f"adapter kind {refused!r} is refused on this family: {why}")
    table = Table(title="parts")
    for column in ("part", "linear layers", "parameters"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for part, params in found.parts.items():
        table.add_row(part, str(found.modules[part]), f"{params:,}")
    console.print(table)
    table = Table(title=f"adapter: {spec.kind}, placement {spec.placement}")
    for column in ("side", "modules", "layer types"):
        table.add_column(column)
    for side, names in found.targets.items():
        table.add_row(side, str(len(names)), ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names})) or "—")
    console.print(table)
    console.print(f"trainable: {found.trainable:,} of {found.total:,} parameters ({found.trainable_pct:.3f}%)")
    skip = ", ".join(found.family.quantization_skip())
    console.print(f"QLoRA (backbone.quantization: 4bit): applies; {found.quantized_linears} linear layers of the "
                  f"language model become 4-bit, and these stay in full precision: {skip}")


@adapters_app.command("kinds")
def adapters_kinds() -> None:
    """Print which adapter kinds work with which placements (the rest are refused)."""
    from strata.adapters.placement import COMPATIBLE
    from strata.config import PLACEMENTS

    table = Table(title="Adapter kinds × placements")
    table.add_column("kind")
    for placement in PLACEMENTS:
        table.add_column(placement, justify="center")
    for kind, ok in COMPATIBLE.items():
        table.add_row(kind, *("yes" if p in ok else "—" for p in PLACEMENTS))
    console.print(table)


@adapters_app.command("merge")
def adapters_merge(
    adapter_dir: Path, out_dir: Path,
    backbone: str = typer.Option(..., help="The full-precision base: builtin:* or a local model dir."),
    quantization: str | None = typer.Option(None, help="The base's quantization, if any (merge refuses it)."),
) -> None:
    """Fold an adapter into a full-precision copy of its base and write a standalone model."""
    from strata.adapters.merge import merge_adapter
    from strata.config import BackboneSpec

    try:
        out = merge_adapter(BackboneSpec(backbone, quantization), None, adapter_dir, out_dir)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    console.print(f"[green]merged[/] {adapter_dir} into {backbone}: {out}")


@probe_app.command("conflict")
def probe_conflict(
    backbone: str = typer.Option("builtin:tiny", help="builtin:tiny, builtin:test, or a local model dir."),
    task: str = typer.Option("colour", help="Built-in task to train and probe on (ignored with --data)."),
    data: Path | None = typer.Option(None, help="A Parquet dataset to probe on instead (its train rows)."),
    reference: str | None = typer.Option(None, help="MoDE reference set: 'pretraining' or a Parquet path."),
    steps: int = typer.Option(20, help="Training steps before the probe (a fresh adapter has no signal)."),
    rows: int = typer.Option(8, help="Rows in the probed batch."),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("runs/probe-conflict"), help="Directory for conflict.json and conflict.png."),
) -> None:
    """cos(∇L_text, ∇L_image) per parameter tensor, for MoDE and a modality-coupled MoE-LoRA."""
    from strata.atomic import write_text
    from strata.backbone.load import resolve
    from strata.config import BackboneSpec
    from strata.data.benchmark import generate_task
    from strata.data.schema import read_table
    from strata.eval.conflict import conflict_table, probe
    from strata.eval.plots import plot_conflict
    from strata.strategies.mode import MoDEConfig

    try:
        spec = BackboneSpec(backbone)
        mode = MoDEConfig() if reference is None else MoDEConfig(reference=reference)
        table = read_table(data) if data else generate_task(task, seed, n_train=max(64, rows), n_val=0, n_test=0)
        report = probe(spec, resolve(spec), table, mode, steps=steps, seed=seed, rows=rows)
    except (ValueError, FileNotFoundError, KeyError) as e:
        fail(str(e))
    console.print(conflict_table(report))
    write_text(out / "conflict.json", json.dumps(report, indent=1))
    plot_conflict(report, out / "conflict.png")
    console.print(f"wrote {out / 'conflict.json'} and {out / 'conflict.png'}")


@monitor_app.command("drift")
def monitor_drift(
    adapter_id: str = typer.Argument(..., help="<stream>/<adapter> whose versions to check."),
    versions: str | None = typer.Option(None, help="Comma-separated versions (default: every committed one)."),
    against: str = typer.Option("production", help="Reference: production, backbone, or a version number."),
    anchor: Path = typer.Option(Path("runs/stream/data"), help="Anchor set: a Parquet file, or a directory of "
                                "<task>.parquet whose val rows are used."),
    rows: int = typer.Option(64, help="Anchor rows."),
    registry: str = REGISTRY,
    out: Path = typer.Option(Path("runs/monitor"), help="Where drift.json and drift.png go."),
) -> None:
    """KL(reference || version) on the anchor set for a set of versions: a table, drift.json and drift.png."""
    from strata.atomic import write_text
    from strata.eval.drift import anchor_table
    from strata.eval.monitor import drift_report
    from strata.eval.plots import plot_drift
    from strata.registry import Registry, RegistryError, parse_id

    try:
        reg = Registry(registry)
        stream, adapter, _ = parse_id(adapter_id, "default")
        chosen = [int(v.strip().lstrip("v")) for v in versions.split(",")] if versions else reg.versions(stream, adapter)
        if not chosen:
            raise RegistryError(f"no committed version of {stream}/{adapter} in registry {registry}")
        report = drift_report(reg, stream, adapter, chosen, against, anchor_table(anchor, rows))
    except (RegistryError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    table = Table(title=f"{report['adapter']}: mean KL against {report['against']} ({report['anchor_rows']} rows)")
    for col in ("version", "task", "stage", "KL (nats/token)", "gate threshold"):
        table.add_column(col)
    for r in report["drift"]:
        table.add_row(f"v{r['version']}", str(r["task"]), r["stage"], f"{r['kl']:.4f}",
                      "—" if r["kl_threshold"] is None else f"{r['kl_threshold']:.3f}")
    console.print(table)
    write_text(out / "drift.json", json.dumps(report, indent=1))
    plot_drift(report, out / "drift.png")
    console.print(f"wrote {out / 'drift.json'} and {out / 'drift.png'}")


@app.command()
def serve(
    config: Path = typer.Option(Path("serve_apps/config.yaml"), help="A `serve deploy` config: its app args."),
    registry: str | None = typer.Option(None, help="Registry root (overrides the config)."),
    backbone: str | None = typer.Option(None, help="The backbone the registry's streams are pinned to."),
    preload: list[str] = typer.Option([], "--preload", help="Serving id to load at start; repeat for several."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="HTTP port."),
    token: str | None = typer.Option(None, envvar="STRATA_SERVE_TOKEN", help="Require this bearer token."),
    verbose: bool = typer.Option(False, "--verbose", help="Also print Ray's logs and a line per request."),
) -> None:
    """Serve the registry's adapters locally: OpenAI chat completions and completions on Ray Serve (Ctrl-C stops it)."""
    from strata import quiet

    quiet.setup(verbose)  # before the libraries are imported: some log when imported
    from ray import serve as ray_serve
    from serve_apps.openai_app import ServeConfig, load_config
    from serve_apps.openai_app import app as build

    from strata.backbone.load import resolve
    from strata.config import BackboneSpec
    from strata.train.driver import init_ray

    try:
        args, _ = load_config(str(config))
        flags = {"registry": registry, "backbone": backbone, "token": token, "preload": preload or None}
        args.update({k: v for k, v in flags.items() if v is not None})
        resolve(BackboneSpec(ServeConfig.from_args(args).backbone))  # bad args fail here, before Ray starts
    except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
        fail(f"{config}: {e}")
    init_ray()
    ray_serve.start(http_options={"host": host, "port": port}, logging_config=quiet.serve_logging())
    console.print(f"serving {args.get('registry')} at http://{host}:{port}/v1 (Ctrl-C stops)")
    ray_serve.run(build(args), name="strata", route_prefix="/", blocking=True, logging_config=quiet.serve_logging())


@app.command("console")
def console_command(
    runs: Path = typer.Option(Path("runs"), help="Where stream output directories are (each `--out` of arrive/run)."),
    registry: str = typer.Option("runs/stream/registry", envvar="STRATA_REGISTRY", help="The registry to show and change."),
    data_root: list[Path] = typer.Option([Path("data")], "--data-root", help="A directory launched datasets may come from; repeat for several."),
    tune_spaces: Path = typer.Option(Path("tune_spaces"), help="The sweep files the page offers."),
    ray_dashboard: str = typer.Option("http://127.0.0.1:8265", help="The Ray dashboard: jobs go there."),
    serve_url: str = typer.Option("http://127.0.0.1:8000", help="The serving ingress (its /v1/stats)."),
    backbone: str | None = typer.Option(None, help="The backbone launched arrivals use (default: the run config's)."),
    executor: str | None = typer.Option(None, help="ray or local, for launched arrivals (default: the run config's)."),
    token: str | None = typer.Option(None, envvar="STRATA_CONSOLE_TOKEN", help="Require sign-in with this token."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8080, help="HTTP port."),
    root_path: str = typer.Option("", help="The path a reverse proxy serves the console under (it strips it)."),
) -> None:
    """The web console: streams, registry (promote, roll back), launches as Ray jobs, serving (Ctrl-C stops it)."""
    import os

    import uvicorn

    from strata.console.app import create_app
    from strata.console.config import ConsoleConfig

    try:
        cfg = ConsoleConfig(runs=runs, registry=registry, data_roots=tuple(data_root), tune_spaces=tune_spaces,
                            ray_dashboard=ray_dashboard, serve_url=serve_url, backbone=backbone, executor=executor,
                            token=token)
    except ValueError as e:
        fail(str(e))
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        console.print("[yellow]warning:[/] no token, and listening beyond loopback: anyone who reaches "
                      f"{host}:{port} can promote versions and launch jobs (set --token)")
    console.print(f"console at http://{host}:{port}/ (Ctrl-C stops)")
    uvicorn.run(create_app(cfg, os.environ.get("STRATA_SERVE_TOKEN")), host=host, port=port, log_level="warning",
                root_path=root_path.rstrip("/"))

