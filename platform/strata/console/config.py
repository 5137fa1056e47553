"""What the console reads and where it may write: typed and frozen, filled by `strata console` flags
or a Serve application's args."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from strata.config import from_dict


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
        if isinstance(self.data_roots, (str, Path)):
            raise ValueError(  # noqa: TRY004 - the edges report ValueErrors
                f"console data_roots must be a list of directories, got {self.data_roots!r}")
        for name in ("runs", "tune_spaces", "repo"):  # YAML args give strings
            object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "data_roots", tuple(Path(p) for p in self.data_roots))
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
        return from_dict(ConsoleConfig, args, "console args")

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
