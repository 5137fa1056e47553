"""The terminal every command prints to, and the one way a command fails."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console()


def fail(message: str, code: int = 1) -> None:
    """Print a clear error and exit non-zero."""
    # No wrapping: a path or an id in an error must come out whole, to be copied.
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)
