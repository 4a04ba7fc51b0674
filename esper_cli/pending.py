"""Commands whose machinery is still being built. They say so and exit 3 rather than pretend."""

from __future__ import annotations

import sys
import typer

NOT_YET = 3


def _not_yet(command: str, what: str) -> None:
    print(f"esper {command}: not available yet: {what}", file=sys.stderr)
    raise typer.Exit(NOT_YET)


def inspect_cache() -> None:
    """Show the kernel cache tiers (the tiered cache is still to come)."""
    _not_yet("inspect-cache", "the tiered kernel cache is still to come")
