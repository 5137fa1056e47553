"""The strategy registry. Every module in this package is one strategy that registers itself.

A strategy module declares its options dataclass and decorates its class with `register`. The
run config keeps each strategy's options under its name (`dgg: {alpha: 0.3}`), validated against
that class; a strategy may also claim a top-level run-config key (`replay_per_task`) for one of
its options. Nothing else in Strata names a strategy's files or fields. Modules are imported
only when their strategy is asked for, so reading a config does not import torch.
"""

from __future__ import annotations

import dataclasses
import pkgutil
from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from strata.config import RunConfig
    from strata.hooks import Strategy

__all__ = ["Entry", "register", "builtin", "names", "get", "load_all", "make_strategy", "options_table"]


@dataclass(frozen=True)
class Entry:
    """One registered strategy: its class, its options dataclass and the run-config keys it claims."""

    name: str
    cls: type
    options: type | None = None  # None: the strategy has no options of its own
    aliases: dict[str, str] = field(default_factory=dict)  # top-level run-config key -> option field

    @property
    def summary(self) -> str:
        """The first line of the class docstring."""
        return (self.cls.__doc__ or "").strip().splitlines()[0] if self.cls.__doc__ else ""

    def defaults(self) -> dict[str, Any]:
        """Option name -> default value."""
        if self.options is None:
            return {}
        return {f.name: getattr(self.options(), f.name) for f in dataclasses.fields(self.options)}


_REGISTRY: dict[str, Entry] = {}


def register(name: str, options: type | None = None, aliases: dict[str, str] | None = None):
    """Class decorator: make `cls` the strategy `name`, built with `opts=<options>` from the run config."""
    from strata.config import check_name

    check_name(name, "strategy name")
    if options is not None and not dataclasses.is_dataclass(options):
        raise TypeError(f"strategy {name!r}: options must be a dataclass, got {options!r}")
    for key, option in (aliases or {}).items():
        if options is None or option not in {f.name for f in dataclasses.fields(options)}:
            raise TypeError(f"strategy {name!r}: alias {key!r} names no option {option!r}")

    def decorate(cls: type) -> type:
        cls.name = name
        _REGISTRY[name] = Entry(name, cls, options, dict(aliases or {}))
        return cls

    return decorate


def builtin() -> list[str]:
    """The strategy modules shipped in this package (found without importing them)."""
    return [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]


def names() -> list[str]:
    """Every known strategy: the built-in modules and anything registered since, sorted."""
    return sorted(set(builtin()) | set(_REGISTRY))


def get(name: str) -> Entry:
    """The registered strategy `name`, importing its built-in module on first use."""
    if name not in _REGISTRY and name in builtin():
        import_module(f"{__name__}.{name}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; known: {names()}")
    return _REGISTRY[name]


def load_all() -> list[Entry]:
    """Every strategy's entry, in name order (imports every built-in module)."""
    return [get(n) for n in names()]


def make_strategy(name: str, cfg: RunConfig) -> Strategy:
    """Build a strategy from its name and the run config."""
    entry = get(name)
    if entry.options is None:
        return entry.cls(adapter=cfg.adapter)
    return entry.cls(adapter=cfg.adapter, opts=cfg.options_for(name))


def _format(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def options_table(only: list[str] | None = None) -> str:
    """The Markdown table of the strategies (default: all) with their options' defaults (README, `strata strategies`)."""
    lines = ["| strategy | what it is | options (default) |", "|---|---|---|"]
    for e in (load_all() if only is None else [get(n) for n in sorted(only)]):
        opts = [f"`{e.name}.{k}` ({_format(v)})" for k, v in e.defaults().items()]
        opts += [f"`{key}` (= `{e.name}.{option}`)" for key, option in e.aliases.items()]
        lines.append(f"| `{e.name}` | {e.summary} | {', '.join(opts) or '—'} |")
    return "\n".join(lines)
