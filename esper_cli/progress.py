"""Progress output: a live rich display on a terminal, plain lines elsewhere (CI logs, pipes).

Both receive the run's event dicts: ``progress`` events with the latest figures, lifecycle events
(those naming a layer), and notices such as the metrics endpoint. Formatting lives only here.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn
from rich.table import Table

Event = dict[str, Any]
_SHOWN_STATES = ("training", "blending", "probation", "fossilized", "culled")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)


def _seeds(counts: dict[str, int]) -> str:
    return " ".join(f"{s}={counts[s]}" for s in _SHOWN_STATES if counts.get(s))


def describe(event: Event) -> str | None:
    """One line for an event worth showing between progress reports, else ``None``."""
    if event["event"] == "metrics_endpoint":
        return f"metrics: {event['url']}"
    if "layer" in event:
        text = f"step {event['step']}: {event['event']} {event.get('blueprint') or ''} in {event['layer']}#{event['slot']}"
        return " ".join(text.split())
    return None


def _val(event: Event, key: str) -> float | None:
    return (event.get("val") or {}).get(key)


class PlainProgress:
    """One line per progress report; lifecycle events on their own lines."""

    def __call__(self, event: Event) -> None:
        if event["event"] != "progress":
            line = describe(event)
            if line:
                print(f"  {line}", flush=True)
            return
        metric = event["metric"]
        print(f"step {event['step']}/{event['max_steps']} loss {_fmt(event['loss'], '.4f')} "
              f"val_loss {_fmt(_val(event, 'loss'), '.4f')} val_{metric} {_fmt(_val(event, metric), '.4f')} "
              f"params {event['params']:,} seeds [{_seeds(event['seeds'])}] {event['elapsed_s']:.1f}s", flush=True)

    def close(self) -> None:
        pass


class RichProgress:
    """A progress bar plus a live table of the latest figures and seed states."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar = Bar(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=console)
        self.task: Any = None
        self.latest: Event | None = None
        self.loss: float | None = None
        self.live = Live(self._render(), console=console, refresh_per_second=8, transient=False)
        self.live.start()

    def _render(self) -> Group:
        table = Table.grid(padding=(0, 2))
        p = self.latest
        if p is not None:
            metric = p["metric"]
            table.add_row("loss", _fmt(self.loss, ".4f"), "val loss", _fmt(_val(p, "loss"), ".4f"),
                          f"val {metric.replace('_', ' ')}", _fmt(_val(p, metric), ".4f"))
            table.add_row("params", f"{p['params']:,}", "seeds", _seeds(p["seeds"]) or "none", "", "")
        return Group(self.bar, table)

    def __call__(self, event: Event) -> None:
        if event["event"] != "progress":
            line = describe(event)
            if line:
                self.console.print(f"  {line}")
            return
        if self.task is None:
            self.task = self.bar.add_task("train", total=event["max_steps"])
        self.bar.update(self.task, completed=event["step"])
        if event["loss"] is not None:  # a validation-only report keeps showing the last training loss
            self.loss = event["loss"]
        self.latest = event
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
