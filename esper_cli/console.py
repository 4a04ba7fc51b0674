"""The rich console every command prints its tables with.

On a terminal rich takes the terminal's width; ``COLUMNS``, when set, overrides it (and is how the
tests pin 80 columns). Piped into a CI log, rich would assume 80 columns and wrap every row of a
wide table, so without a terminal or ``COLUMNS`` the width is :data:`LOG_WIDTH`. Colour follows
rich's rules: none when not a terminal, none when ``NO_COLOR`` is set.
"""

from __future__ import annotations

import os

from rich.console import Console

LOG_WIDTH = 160


def make_console() -> Console:
    console = Console()
    if console.is_terminal or os.environ.get("COLUMNS", "").strip().isdigit():
        return console
    return Console(width=LOG_WIDTH)
