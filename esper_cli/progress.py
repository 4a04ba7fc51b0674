"""Progress output: a live rich display on a terminal, plain lines elsewhere (CI logs, pipes).

Both receive the run's event dicts: ``progress`` events with the latest figures, lifecycle events
(those naming a layer), and notices such as the metrics endpoint. Formatting lives only here.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

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
        ranks = event.get("ranks")  # under torchrun: every rank's own endpoint, in rank order
        return f"metrics: {event['url']}" if not ranks else \
            "metrics: " + ", ".join(f"rank {rank} {url}" for rank, url in enumerate(ranks))
    if event["event"] == "kernels_compiling":
        count = event["kernels"]
        return f"compiling {count} kernel{'s' if count != 1 else ''} (cached for later runs)..."
    if event["event"] == "kernels_ready" and event["seconds"] >= 1.0:
        return f"kernels ready in {event['seconds']:.1f}s"
    if event["event"] == "graph_compiled":
        what = f"step {event['step']}: compiled graph for {event['seeds']} seed{'s' if event['seeds'] != 1 else ''}"
        if event["ok"]:
            return f"{what} in {event['seconds']:.1f}s (off the training thread)"
        return f"{what} failed ({event['error']}); that topology runs eagerly"
    if event["event"] == "seed_lr":
        return f"step {event['step']}: {event['reason']}"
    if "layer" in event:
        text = f"step {event['step']}: {event['event']} {event.get('blueprint') or ''} in {event['layer']}#{event['slot']}"
        return " ".join(text.split())
    return None


def _val(event: Event, key: str) -> float | None:
    return (event.get("val") or {}).get(key)


class Pace:
    """Steps per second since the first progress report (kernel waits and warm-up before it do not
    count) and the time left at that pace."""

    def __init__(self) -> None:
        self.first: tuple[int, float] | None = None

    def update(self, event: Event) -> tuple[float | None, float | None]:
        step, elapsed = event["step"], event["elapsed_s"]
        if self.first is None or step < self.first[0]:
            self.first = (step, elapsed)
        steps, seconds = step - self.first[0], elapsed - self.first[1]
        if steps <= 0 or seconds <= 0:
            return None, None
        rate = steps / seconds
        return rate, (event["max_steps"] - step) / rate


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PlainProgress:
    """One line per progress report; lifecycle events on their own lines (on ``stream``)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.pace = Pace()
        self.stream = stream

    def __call__(self, event: Event) -> None:
        if event["event"] != "progress":
            line = describe(event)
            if line:
                print(f"  {line}", flush=True, file=self.stream)
            return
        metric = event["metric"]
        rate, left = self.pace.update(event)
        print(f"step {event['step']}/{event['max_steps']} loss {_fmt(event['loss'], '.4f')} "
              f"val_loss {_fmt(_val(event, 'loss'), '.4f')} val_{metric} {_fmt(_val(event, metric), '.4f')} "
              f"params {event['params']:,} seeds [{_seeds(event['seeds'])}] {event['elapsed_s']:.1f}s "
              f"{_fmt(rate, '.1f')} steps/s eta {_clock(left)}", flush=True, file=self.stream)

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
        self.pace = Pace()
        self.rate: float | None = None
        self.left: float | None = None
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
            table.add_row("steps/s", _fmt(self.rate, ".1f"), "eta", _clock(self.left), "", "")
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
        self.rate, self.left = self.pace.update(event)
        self.live.update(self._render())

    def close(self) -> None:
        self.live.stop()


def make_progress(mode: str, console: Console) -> PlainProgress | RichProgress | None:
    """``auto`` is rich on a terminal and plain otherwise; ``none`` prints nothing during training.
    Progress goes where ``console`` writes (stderr when stdout carries ``--json`` output)."""
    if mode == "none":
        return None
    stream = sys.stderr if console.stderr else sys.stdout
    if mode == "rich" or (mode == "auto" and console.is_terminal and stream.isatty()):
        return RichProgress(console)
    return PlainProgress(sys.stderr if console.stderr else None)
