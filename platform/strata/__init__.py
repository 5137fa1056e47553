"""Strata: continual instruction tuning of vision-language models on Ray."""

from __future__ import annotations

from typing import Any


def run(config: Any = None, **fields: Any) -> dict[str, dict]:
    """Python API for `strata run`: a RunConfig, or its fields as keywords (nested ones as dicts)."""
    from strata.config import RunConfig
    from strata.pipeline import run as run_pipeline
    from strata.strategies import run_config

    cfg = config if isinstance(config, RunConfig) else run_config(fields, "strata.run()")
    return run_pipeline(cfg)
