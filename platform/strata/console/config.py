"""What the console reads and where it may write: typed and frozen, filled by `strata console` flags."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class ConsoleConfig:
    """Roots, addresses and the token of one console."""

    runs: Path = Path("runs")  # each <runs>/<out>/ is a stream's output directory (`--out` of arrive and run)
    registry: str = "runs/stream/registry"  # the registry promote and roll back act on (the serving one)
    data_roots: tuple[Path, ...] = (Path("data"),)  # an arrival's dataset must lie under one of these
    tune_spaces: Path = Path("tune_spaces")  # the sweep files a user may launch
    ray_dashboard: str = "http://127.0.0.1:8265"  # where jobs are submitted (JobSubmissionClient) and linked
    serve_url: str = "http://127.0.0.1:8000"  # the serving ingress: /v1/stats and a link to it
    serve_app: str = "strata"  # the Serve application that scaling changes
    backbone: str | None = None  # the backbone launched arrivals use (None: the run config's default)
    executor: str | None = None  # "ray" or "local" for launched arrivals (None: the run config's default)
    token: str | None = None  # sign-in token; None: no sign-in (every POST still needs the page's CSRF token)
    repo: Path = Path(".")  # the repository jobs run in (their working directory)

    def __post_init__(self) -> None:
        for url in (self.ray_dashboard, self.serve_url):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"console address {url!r} must start with http:// or https://")
        if self.executor not in (None, "ray", "local"):
            raise ValueError(f"console executor must be ray or local, got {self.executor!r}")
        if not self.data_roots:
            raise ValueError("the console needs at least one data root for launched arrivals")

    @staticmethod
    def from_args(args: dict) -> ConsoleConfig:
        """Fill the config from a Serve application's args (unknown keys are an error)."""
        known = {f.name for f in fields(ConsoleConfig)}
        if unknown := set(args) - known:
            raise ValueError(f"unknown console arg(s) {sorted(unknown)}; known: {sorted(known)}")
        values = {k: Path(v) if k in ("runs", "tune_spaces", "repo") else v for k, v in args.items()}
        if "data_roots" in values:
            if not isinstance(values["data_roots"], list):
                raise ValueError(f"console arg data_roots must be a list of directories, got {values['data_roots']!r}")
            values["data_roots"] = tuple(Path(p) for p in values["data_roots"])
        return ConsoleConfig(**values)

    def within_data_roots(self, path: str) -> Path:
        """The dataset path, resolved, if it lies under a data root; else a ValueError that says which roots."""
        resolved = Path(path).expanduser().resolve()
        for root in self.data_roots:
            if resolved.is_relative_to(root.resolve()):
                if not resolved.is_file():
                    raise ValueError(f"dataset {path!r} does not exist")
                return resolved
        roots = ", ".join(str(r) for r in self.data_roots)
        raise ValueError(f"dataset {path!r} is outside the console's data roots ({roots})")
