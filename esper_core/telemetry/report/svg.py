"""Two chart kinds as inline SVG text: line charts with event markers, and state timelines.

Written by hand rather than with a plotting library so that a report is one self-contained file
that renders anywhere (no JavaScript, no network, no fonts to fetch) and Esper needs no plotting
dependency. Every piece of text is escaped: event reasons come from a log a user may have edited.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

WIDTH = 1000
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 52, 40
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


def _fmt(value: float) -> str:
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.1e}"
    return f"{value:,.0f}" if abs(value) >= 100 and value == round(value) else f"{value:,.4g}"


class _Frame:
    """Maps data coordinates to pixels inside the plot area."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float], height: int) -> None:
        self.x0, self.x1 = x_range if x_range[1] > x_range[0] else (x_range[0], x_range[0] + 1)
        pad = max(0.5, abs(y_range[0]) * 0.05)  # a flat series (parameters without growth) sits mid-plot
        self.y0, self.y1 = y_range if y_range[1] > y_range[0] else (y_range[0] - pad, y_range[0] + pad)
        self.height = height

    def x(self, value: float) -> float:
        return _LEFT + (value - self.x0) / (self.x1 - self.x0) * (WIDTH - _LEFT - _RIGHT)

    def y(self, value: float) -> float:
        return self.height - _BOTTOM - (value - self.y0) / (self.y1 - self.y0) * (self.height - _TOP - _BOTTOM)


def _open(svg_id: str, title: str, height: int) -> list[str]:
    return [f'<svg id="{escape(svg_id)}" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{escape(title)}">',
            f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>',
            f'<text x="{_LEFT}" y="18" {_FONT} font-weight="bold">{escape(title)}</text>']


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


def _legend(entries: list[tuple[str, str]], x: float) -> list[str]:
    """Colour keys on one row under the title."""
    out = []
    for label, color in entries:
        out.append(f'<rect x="{x}" y="27" width="12" height="12" fill="{color}"/>'
                   f'<text x="{x + 16}" y="37" {_FONT}>{escape(label)}</text>')
        x += 26 + 7 * len(label)
    return out


def line_chart(svg_id: str, title: str, series: list[Series], markers: list[Marker], x_range: tuple[float, float],
               x_label: str = "step", height: int = 300, y_range: tuple[float, float] | None = None) -> str:
    """Lines over a shared x axis, with a vertical marker per event and a legend of both."""
    ys = [y for s in series for _, y in s.points if math.isfinite(y)]
    if y_range is None:
        y_range = (min(ys, default=0.0), max(ys, default=1.0))
        pad = (y_range[1] - y_range[0]) * 0.05
        y_range = (y_range[0] - pad, y_range[1] + pad)
    frame = _Frame(x_range, y_range, height)
    out = _open(svg_id, title, height)
    for tick in nice_ticks(frame.y0, frame.y1, 5):
        py = frame.y(tick)
        out.append(f'<line x1="{_LEFT}" y1="{py:.1f}" x2="{WIDTH - _RIGHT}" y2="{py:.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{_LEFT - 6}" y="{py + 4:.1f}" {_FONT} text-anchor="end">{_fmt(tick)}</text>')
    top, bottom = _TOP, height - _BOTTOM
    for m in markers:
        px = frame.x(m.x)
        out.append(f'<line class="event-marker" data-kind="{escape(m.kind)}" x1="{px:.1f}" y1="{top}" x2="{px:.1f}" '
                   f'y2="{bottom}" stroke="{m.color}" stroke-width="1.5" stroke-dasharray="3,2">'
                   f'<title>{escape(m.title)}</title></line>')
    for s in series:
        points = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in s.points if math.isfinite(y))
        dash = ' stroke-dasharray="6,3"' if s.dashed else ""
        out.append(f'<polyline class="series" fill="none" stroke="{s.color}" stroke-width="2.5"{dash} '
                   f'points="{points}"><title>{escape(s.label)}</title></polyline>')
    out += _x_axis(frame, x_label)
    legend = [(s.label, s.color) for s in series] + sorted({(m.kind, m.color) for m in markers})
    out += _legend(legend, _LEFT)
    out.append("</svg>")
    return "\n".join(out)


def timeline(svg_id: str, title: str, rows: list[tuple[str, list[Bar]]], x_range: tuple[float, float],
             legend: dict[str, str], x_label: str = "step") -> str:
    """One row per label (a seed slot), a coloured bar per interval (a lifecycle state)."""
    row_height = 24
    height = _TOP + row_height * max(len(rows), 1) + _BOTTOM
    frame = _Frame(x_range, (0, 1), height)
    out = _open(svg_id, title, height)
    left = 170  # slot names are long; the bars start after them
    scale = (WIDTH - left - _RIGHT) / (frame.x1 - frame.x0)
    for r, (label, bars) in enumerate(rows):
        y = _TOP + r * row_height
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
    out += _legend(list(legend.items()), left)
    if not rows:
        out.append(f'<text x="{left}" y="{_TOP + 12}" {_FONT}>no seed slots recorded</text>')
    out.append("</svg>")
    return "\n".join(out)
