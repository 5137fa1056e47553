"""docs/ARCHITECTURE.md names only modules, files and functions that exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
NAMES = re.findall(r"`([^`\s]+)`", DOC.read_text())
DOTTED = sorted({n for n in NAMES if re.fullmatch(r"strata(\.\w+)+", n)})
PATHS = sorted({n for n in NAMES if re.fullmatch(r"[\w/.-]+(\.(py|md|yaml)|/)", n)})
HOOKS = sorted({n.split(".")[1] for n in NAMES if re.fullmatch(r"Strategy\.\w+", n)})


def resolve(name: str) -> object:
    """Import the longest module prefix of a dotted name, then follow attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def test_the_document_names_things() -> None:
    assert len(DOTTED) > 40 and len(PATHS) > 4 and len(HOOKS) > 10


@pytest.mark.parametrize("name", DOTTED)
def test_every_named_module_and_function_exists(name: str) -> None:
    resolve(name)


@pytest.mark.parametrize("path", PATHS)
def test_every_named_file_exists(path: str) -> None:
    assert (ROOT / path).exists() or (ROOT / "platform" / path).exists(), path


def test_every_named_hook_is_a_strategy_hook_and_every_hook_is_named() -> None:
    from strata.hooks import Strategy

    hooks = {n for n, v in vars(Strategy).items() if callable(v) and not n.startswith("_")}
    assert set(HOOKS) <= hooks
    assert hooks - {"adapter_name", "eval_adapters"} <= set(HOOKS), "a hook is missing from the hook table"
