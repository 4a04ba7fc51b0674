"""The rich console every command prints its tables with.

On a terminal rich takes the terminal's width; ``COLUMNS``, when set, overrides it (and is how the
tests pin 80 columns). Piped into a CI log, rich would assume 80 columns and wrap every row of a
wide table, so without a terminal or ``COLUMNS`` the width is :data:`LOG_WIDTH`. Colour follows
rich's rules: none when not a terminal, none when ``NO_COLOR`` is set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from rich.text import Text

LOG_WIDTH = 160


def make_console() -> Console:
    console = Console()
    if console.is_terminal or os.environ.get("COLUMNS", "").strip().isdigit():
        return console
    return Console(width=LOG_WIDTH)


@dataclass(frozen=True)
class Col:
    """A column of a :func:`fitted_table`; ``optional`` columns are left out, last first, when the
    table would not fit the console without breaking a word."""

    header: str
    justify: str = "left"
    optional: bool = False
    style: Callable[[str], str] | None = None
    """The rich style of a cell from its text (e.g. red for a tier that is down); none by default."""


def fitted_table(title: str | None, columns: list[Col], rows: list[list[str]], width: int,
                 caption: str | None = None) -> tuple[Table, list[int]]:
    """A table that rich can lay out in ``width`` columns without cutting or folding any word.

    Rich wraps a cell at spaces, so a column needs at least its longest word; while the sum of those
    (plus borders and padding) exceeds ``width``, the last optional column is dropped. Returns the
    table and the indices of the columns kept (so a caller can print what was dropped elsewhere).
    """
    def longest(index: int) -> int:
        words = [w for text in [columns[index].header, *(row[index] for row in rows)] for w in text.split()]
        return max((len(w) for w in words), default=1)

    kept = list(range(len(columns)))
    while sum(longest(i) + 3 for i in kept) + 1 > width:
        optional = [i for i in kept if columns[i].optional]
        if not optional:
            break
        kept.remove(optional[-1])
    table = Table(title=title, caption=caption)
    for i in kept:
        table.add_column(columns[i].header, justify=columns[i].justify, min_width=longest(i))  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*(Text(row[i], style=columns[i].style(row[i]) if columns[i].style else "") for i in kept))
    return table, kept
