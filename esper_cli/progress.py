"""Progress output: a live rich display on a terminal, plain lines elsewhere (CI logs, pipes)."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from esper_core.training.trainer import Progress

_SHOWN_STATES = ("training", "blending", "probation", "fossilized", "culled")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)


def _seeds(counts: dict[str, int]) -> str:
    return " ".join(f"{s}={counts[s]}" for s in _SHOWN_STATES if counts.get(s))


class PlainProgress:
    """One line per report; lifecycle events on their own lines."""

    def __call__(self, p: Progress) -> None:
        if p.last_event:
            print(f"  {p.last_event}", flush=True)
            return
        print(f"step {p.step}/{p.max_steps} loss {_fmt(p.loss, '.4f')} val_loss {_fmt(p.val_loss, '.4f')} "
              f"val_acc {_fmt(p.val_accuracy, '.4f')} params {p.params:,} seeds [{_seeds(p.seeds)}] "
              f"{p.elapsed_s:.1f}s", flush=True)

    def close(self) -> None:
        pass


class RichProgress:
    """A progress bar plus a live table of the latest figures and seed states."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar = Bar(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=console)
        self.task: Any = None
        self.latest: Progress | None = None
        self.live = Live(self._render(), console=console, refresh_per_second=8, transient=False)
        self.live.start()

    def _render(self) -> Group:
        table = Table.grid(padding=(0, 2))
        p = self.latest
        if p is not None:
            table.add_row("loss", _fmt(p.loss, ".4f"), "val loss", _fmt(p.val_loss, ".4f"),
                          "val acc", _fmt(p.val_accuracy, ".4f"))
            table.add_row("params", f"{p.params:,}", "seeds", _seeds(p.seeds) or "none", "", "")
        return Group(self.bar, table)

    def __call__(self, p: Progress) -> None:
        if self.task is None:
            self.task = self.bar.add_task("train", total=p.max_steps)
        self.bar.update(self.task, completed=p.step)
        if p.last_event:
            self.console.print(f"  {p.last_event}")
        elif p.loss == p.loss or self.latest is None:
            self.latest = p
        else:  # a validation-only report: keep showing the last training loss
            self.latest = replace(p, loss=self.latest.loss)
        self.live.update(self._render())

    def close(self) -> None:
        self.live.stop()


def make_progress(mode: str, console: Console) -> PlainProgress | RichProgress | None:
    """``auto`` is rich on a terminal and plain otherwise; ``none`` prints nothing during training."""
    if mode == "none":
        return None
    if mode == "rich" or (mode == "auto" and console.is_terminal and sys.stdout.isatty()):
        return RichProgress(console)
    return PlainProgress()
