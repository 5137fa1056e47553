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

from strata.config import RunConfig, check_name, from_dict

if TYPE_CHECKING:
    from strata.hooks import Strategy

__all__ = ["Entry", "register", "builtin", "names", "get", "load_all", "run_config", "options_for", "make_strategy",
           "options_table"]


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

    def option_keys(self) -> list[tuple[str, str]]:
        """(run-config key, what it sets) for every option: `dgg.alpha` and its default, then the aliases."""
        keys = [(f"{self.name}.{k}", _format(v)) for k, v in self.defaults().items()]
        return keys + [(key, f"= {self.name}.{option}") for key, option in self.aliases.items()]


_REGISTRY: dict[str, Entry] = {}


def register(name: str, options: type | None = None, aliases: dict[str, str] | None = None):
    """Class decorator: make `cls` the strategy `name`, built with `opts=<options>` from the run config."""
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


def run_config(data: dict[str, Any], where: str = "run config") -> RunConfig:
    """A RunConfig from a mapping (YAML, CLI flags): each strategy's section (`dgg: {...}`) and the
    top-level keys a strategy claims (`replay_per_task`) become its options, validated by its class."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    if isinstance(data.get("options"), dict):  # dataclasses.asdict(cfg) (best.yaml, manifests) reads back
        data = {**{k: v for k, v in data.items() if k != "options"}, **data["options"]}
    fields = {f.name for f in dataclasses.fields(RunConfig)} - {"options"}
    extra = [k for k in data if k not in fields]
    entries = {e.name: e for e in load_all()} if extra else {}
    claimed = {key: [e for e in entries.values() if key in e.aliases] for e in entries.values() for key in e.aliases}
    unknown = sorted(k for k in extra if not (k in entries and entries[k].options) and k not in claimed)
    if unknown:
        known = sorted(fields | {n for n, e in entries.items() if e.options} | set(claimed))
        raise ValueError(f"unknown key(s) in {where}: {', '.join(unknown)}; known: {known}")
    sections: dict[str, dict] = {}
    for k in (k for k in extra if k in entries):
        if data[k] is not None and not isinstance(data[k], dict):
            raise ValueError(f"{where}.{k} must be a mapping, got {type(data[k]).__name__}")
        sections[k] = dict(data[k] or {})
    for key in (k for k in extra if k in claimed):
        for entry in claimed[key]:
            sections.setdefault(entry.name, {}).setdefault(entry.aliases[key], data[key])  # its own section wins
    options = {name: from_dict(entries[name].options, values, f"{where}.{name}") for name, values in sections.items()}
    cfg = from_dict(RunConfig, {k: v for k, v in data.items() if k in fields}, where)
    for name in cfg.strategies:
        get(name)  # an unknown name fails here, with the known ones
    return dataclasses.replace(cfg, options=options)


def options_for(cfg: RunConfig, name: str) -> Any:
    """The options of strategy `name` in `cfg`: what the config set, else the strategy's defaults."""
    entry = get(name)
    opts = cfg.options.get(name)
    if opts is None:
        return entry.options() if entry.options is not None else None
    if entry.options is None or not isinstance(opts, entry.options):
        raise ValueError(f"options of strategy {name!r} must be a {getattr(entry.options, '__name__', 'None')}, "
                         f"got {type(opts).__name__}")
    return opts


def make_strategy(name: str, cfg: RunConfig) -> Strategy:
    """Build a strategy from its name and the run config."""
    entry = get(name)
    if entry.options is None:
        return entry.cls(adapter=cfg.adapter)
    return entry.cls(adapter=cfg.adapter, opts=options_for(cfg, name))


def _format(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def options_table(only: list[str] | None = None) -> str:
    """The Markdown table of the strategies (default: all) with their options' defaults (README, `strata strategies`)."""
    lines = ["| strategy | what it is | options (default) |", "|---|---|---|"]
    for e in (load_all() if only is None else [get(n) for n in sorted(only)]):
        opts = [f"`{key}` ({value})" for key, value in e.option_keys()]
        lines.append(f"| `{e.name}` | {e.summary} | {', '.join(opts) or '—'} |")
    return "\n".join(lines)
