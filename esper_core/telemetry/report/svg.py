"""Two chart kinds as inline SVG text: line charts with event markers, and state timelines.

Written by hand rather than with a plotting library so that a report is one self-contained file
that renders anywhere (no JavaScript, no network, no fonts to fetch) and Esper needs no plotting
dependency. Every piece of text is escaped: event reasons come from a log a user may have edited.

Charts scale to their container (``width="100%"`` and a ``viewBox``), both axes are labelled, and a
line chart can use a log y axis (losses fall by orders of magnitude; on a linear axis the late
curve, where growth happens, is pinned to the floor). Event markers are small symbols above the
plot on their event's step line; markers closer than a symbol's width are stacked, never drawn on
top of each other, and each carries its own ``<title>`` (the hover text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

WIDTH = 1000
_LEFT, _RIGHT, _TOP, _BOTTOM = 78, 20, 52, 40
MARKER_SIZE = 9
"""Side of an event marker's symbol, in viewBox pixels; markers nearer than this on x are stacked."""
_MARKER_ROW = MARKER_SIZE + 3
_FONT = 'font-family="sans-serif" font-size="12"'


@dataclass(frozen=True)
class Series:
    label: str
    points: list[tuple[float, float]]
    color: str
    dashed: bool = False


@dataclass(frozen=True)
class Marker:
    """A vertical line at ``x`` (an event), coloured by its kind; ``title`` is its tooltip."""

    x: float
    kind: str
    color: str
    title: str


@dataclass(frozen=True)
class Bar:
    start: float
    end: float
    state: str
    color: str


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering ``[low, high]``."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((high - first) / step + 1e-9) + 1)]


def log_ticks(low: float, high: float) -> list[float]:
    """Tick values for a log axis over ``[low, high]`` (both > 0): decades, with 2 and 5 between
    them when the range spans fewer than three decades."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    steps = (1, 2, 5) if last - first <= 3 else (1,)
    ticks = [m * 10.0 ** e for e in range(first, last + 1) for m in steps]
    inside = [round(t, 12) for t in ticks if low * (1 - 1e-9) <= t <= high * (1 + 1e-9)]
    return inside or [low, high]


def _fmt(value: float) -> str:
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.1e}"
    return f"{value:,.0f}" if abs(value) >= 100 and value == round(value) else f"{value:,.4g}"


class _Frame:
    """Maps data coordinates to pixels inside the plot area (``top`` is the plot area's top edge)."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float], height: int,
                 top: int = _TOP, log_y: bool = False) -> None:
        self.x0, self.x1 = x_range if x_range[1] > x_range[0] else (x_range[0], x_range[0] + 1)
        if log_y:
            low, high = y_range
            self.y0, self.y1 = (low, high) if high > low else (low / 2, low * 2)
        else:
            pad = max(0.5, abs(y_range[0]) * 0.05)  # a flat series (parameters without growth) sits mid-plot
            self.y0, self.y1 = y_range if y_range[1] > y_range[0] else (y_range[0] - pad, y_range[0] + pad)
        self.height, self.top, self.log_y = height, top, log_y

    def x(self, value: float) -> float:
        return _LEFT + (value - self.x0) / (self.x1 - self.x0) * (WIDTH - _LEFT - _RIGHT)

    def y(self, value: float) -> float:
        if self.log_y:
            share = (math.log10(value) - math.log10(self.y0)) / (math.log10(self.y1) - math.log10(self.y0))
        else:
            share = (value - self.y0) / (self.y1 - self.y0)
        return self.height - _BOTTOM - share * (self.height - self.top - _BOTTOM)

    def y_ticks(self) -> list[float]:
        return log_ticks(self.y0, self.y1) if self.log_y else nice_ticks(self.y0, self.y1, 5)


def _open(svg_id: str, title: str, height: int) -> list[str]:
    """The root element: as wide as its container, the aspect ratio of the viewBox."""
    return [f'<svg id="{escape(svg_id)}" xmlns="http://www.w3.org/2000/svg" width="100%" '
            f'viewBox="0 0 {WIDTH} {height}" preserveAspectRatio="xMinYMin meet" role="img" '
            f'aria-label="{escape(title)}">',
            f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>',
            f'<text x="{_LEFT}" y="18" {_FONT} font-weight="bold">{escape(title)}</text>']


def _y_label(frame: _Frame, label: str) -> str:
    """The y axis' name, written upwards along the axis."""
    middle = (frame.top + frame.height - _BOTTOM) / 2
    return (f'<text class="axis-label" x="16" y="{middle:.0f}" {_FONT} text-anchor="middle" '
            f'transform="rotate(-90 16 {middle:.0f})">{escape(label)}</text>')


def stack_levels(xs: list[float], size: float = MARKER_SIZE) -> list[int]:
    """A stacking level per marker (0 = lowest row): a marker nearer than ``size`` on x to one already
    placed on a level goes to the next level up, so no symbol covers another."""
    placed: list[list[float]] = []  # per level, the x of the markers on it
    levels = []
    for x in xs:
        level = next((i for i, row in enumerate(placed) if all(abs(x - other) >= size for other in row)), len(placed))
        if level == len(placed):
            placed.append([])
        placed[level].append(x)
        levels.append(level)
    return levels


def _x_axis(frame: _Frame, label: str) -> list[str]:
    out = []
    bottom = frame.height - _BOTTOM
    for tick in nice_ticks(frame.x0, frame.x1):
        px = frame.x(tick)
        out.append(f'<line x1="{px:.1f}" y1="{bottom}" x2="{px:.1f}" y2="{bottom + 4}" stroke="#555"/>'
                   f'<text x="{px:.1f}" y="{bottom + 17}" {_FONT} text-anchor="middle">{_fmt(tick)}</text>')
    out.append(f'<line x1="{_LEFT}" y1="{bottom}" x2="{WIDTH - _RIGHT}" y2="{bottom}" stroke="#555"/>')
    out.append(f'<text x="{(WIDTH + _LEFT) / 2:.0f}" y="{frame.height - 6}" {_FONT} '
               f'text-anchor="middle">{escape(label)}</text>')
    return out


_LEGEND_ROW = 16


def _legend(entries: list[tuple[str, str]], x: float) -> tuple[list[str], int]:
    """Colour keys under the title, wrapped onto as many rows as the width needs; returns the SVG
    parts and the number of extra rows (beyond the first) the caller must leave room for."""
    out, row, left = [], 0, x
    for label, color in entries:
        width = 26 + 7 * len(label)
        if x + width > WIDTH - _RIGHT and x > left:
            row, x = row + 1, left
        y = 27 + row * _LEGEND_ROW
        out.append(f'<rect x="{x}" y="{y}" width="12" height="12" fill="{color}"/>'
                   f'<text x="{x + 16}" y="{y + 10}" {_FONT}>{escape(label)}</text>')
        x += width
    return out, row


def line_chart(svg_id: str, title: str, series: list[Series], markers: list[Marker], x_range: tuple[float, float],
               x_label: str = "step", y_label: str = "", height: int = 300, y_range: tuple[float, float] | None = None,
               log_y: bool = False) -> str:
    """Lines over a shared x axis, with a stacked marker per event and a legend of both.

    With ``log_y`` the y axis is logarithmic; points <= 0 cannot be placed on it and are left out
    (a line chart of a loss never has them; if every point is <= 0 the axis falls back to linear).
    """
    usable = (lambda y: math.isfinite(y) and y > 0) if log_y else math.isfinite
    ys = [y for s in series for _, y in s.points if usable(y)]
    log_y = log_y and bool(ys)
    if not log_y:
        usable = math.isfinite
        ys = [y for s in series for _, y in s.points if usable(y)]
    if y_range is None:
        low, high = min(ys, default=0.0), max(ys, default=1.0)
        if log_y:
            y_range = (low / 1.15, high * 1.15)
        else:
            pad = (high - low) * 0.05
            y_range = (low - pad, high + pad)
    probe = _Frame(x_range, (0, 1), height)
    ordered = sorted(markers, key=lambda m: (m.x, m.kind, m.title))
    levels = stack_levels([probe.x(m.x) for m in ordered])
    legend, legend_rows = _legend([(s.label, s.color) for s in series] + sorted({(m.kind, m.color) for m in markers}),
                                  _LEFT)
    extra = (max(levels, default=-1) + 1) * _MARKER_ROW + legend_rows * _LEGEND_ROW
    top = _TOP + extra
    height += extra  # the plot area keeps its size; legend and marker rows are added above it
    frame = _Frame(x_range, y_range, height, top, log_y)
    out = _open(svg_id, title, height)
    for tick in frame.y_ticks():
        py = frame.y(tick)
        out.append(f'<line x1="{_LEFT}" y1="{py:.1f}" x2="{WIDTH - _RIGHT}" y2="{py:.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{_LEFT - 6}" y="{py + 4:.1f}" {_FONT} text-anchor="end">{_fmt(tick)}</text>')
    bottom = height - _BOTTOM
    for m, level in zip(ordered, levels):
        px = frame.x(m.x)
        cy = top - 4 - level * _MARKER_ROW - MARKER_SIZE / 2
        half = MARKER_SIZE / 2
        out.append(f'<g class="event-marker" data-kind="{escape(m.kind)}" data-step="{m.x:g}">'
                   f'<title>{escape(m.title)}</title>'
                   f'<line x1="{px:.1f}" y1="{cy + half:.1f}" x2="{px:.1f}" y2="{bottom}" stroke="{m.color}" '
                   f'stroke-width="1.5" stroke-dasharray="3,2"/>'
                   f'<rect x="{px - half:.1f}" y="{cy - half:.1f}" width="{MARKER_SIZE}" height="{MARKER_SIZE}" '
                   f'fill="{m.color}" stroke="#ffffff" stroke-width="0.5"/></g>')
    for s in series:
        points = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in s.points if usable(y))
        dash = ' stroke-dasharray="6,3"' if s.dashed else ""
        out.append(f'<polyline class="series" fill="none" stroke="{s.color}" stroke-width="2.5"{dash} '
                   f'points="{points}"><title>{escape(s.label)}</title></polyline>')
    out += _x_axis(frame, x_label)
    out.append(_y_label(frame, f"{y_label} (log scale)" if log_y and y_label else y_label))
    out += legend
    out.append("</svg>")
    return "\n".join(out)


def timeline(svg_id: str, title: str, rows: list[tuple[str, list[Bar]]], x_range: tuple[float, float],
             legend: dict[str, str], x_label: str = "step") -> str:
    """One row per label (a seed slot), a coloured bar per interval (a lifecycle state)."""
    row_height = 24
    left = 170  # slot names are long; the bars start after them
    keys, legend_rows = _legend(list(legend.items()), left)
    top = _TOP + legend_rows * _LEGEND_ROW
    height = top + row_height * max(len(rows), 1) + _BOTTOM
    frame = _Frame(x_range, (0, 1), height, top)
    out = _open(svg_id, title, height)
    scale = (WIDTH - left - _RIGHT) / (frame.x1 - frame.x0)
    for r, (label, bars) in enumerate(rows):
        y = top + r * row_height
        out.append(f'<rect x="{left}" y="{y}" width="{WIDTH - left - _RIGHT}" height="{row_height - 6}" '
                   f'fill="#f3f3f3"/><text x="{left - 6}" y="{y + 13}" {_FONT} text-anchor="end">{escape(label)}</text>')
        for bar in bars:
            x0 = left + (bar.start - frame.x0) * scale
            width = max((bar.end - bar.start) * scale, 2.0)
            out.append(f'<rect class="state-bar" data-state="{escape(bar.state)}" x="{x0:.1f}" y="{y}" '
                       f'width="{width:.1f}" height="{row_height - 6}" fill="{bar.color}">'
                       f'<title>{escape(f"{label}: {bar.state} from step {bar.start:g} to {bar.end:g}")}</title></rect>')
    bottom = height - _BOTTOM
    for tick in nice_ticks(frame.x0, frame.x1):
        px = left + (tick - frame.x0) * scale
        out.append(f'<line x1="{px:.1f}" y1="{bottom}" x2="{px:.1f}" y2="{bottom + 4}" stroke="#555"/>'
                   f'<text x="{px:.1f}" y="{bottom + 17}" {_FONT} text-anchor="middle">{_fmt(tick)}</text>')
    out.append(f'<text x="{(WIDTH + left) / 2:.0f}" y="{height - 6}" {_FONT} text-anchor="middle">'
               f'{escape(x_label)}</text>')
    out.append(_y_label(frame, "seed slot"))
    out += keys
    if not rows:
        out.append(f'<text x="{left}" y="{top + 12}" {_FONT}>no seed slots recorded</text>')
    out.append("</svg>")
    return "\n".join(out)
