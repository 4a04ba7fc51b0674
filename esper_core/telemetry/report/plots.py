"""The report's four plots, drawn from the report dict: loss, validation accuracy, parameters, seed slots.

Every morphogenetic event (germinate, fossilize, cull, rollback, anomaly, checkpoint...) is marked
on the loss and accuracy plots, so a change in a curve can be read against the change in the model
that preceded it.
"""

from __future__ import annotations

from typing import Any

from esper_core.telemetry.report.svg import Bar, Marker, Series, line_chart, timeline

SERIES_COLORS = {"loss": "#1f77b4", "val_loss": "#ff7f0e", "val_accuracy": "#2ca02c", "params": "#9467bd"}
EVENT_COLORS = {"germinate": "#17becf", "blend": "#bcbd22", "fossilize": "#006400", "cull": "#d62728",
                "rollback": "#8b0000", "anomaly": "#e377c2", "checkpoint": "#7f7f7f", "run_resume": "#000000"}
"""Marked events; the other lifecycle steps (incubate, probation, reopen) show in the slot timeline."""
STATE_COLORS = {"germinated": "#c7c7c7", "training": "#aec7e8", "blending": "#ffbb78", "probation": "#dbdb8d",
                "fossilized": "#98df8a", "culled": "#d62728", "rolled_back": "#8b0000"}

PLOT_IDS = ("plot-loss", "plot-accuracy", "plot-params", "plot-lifecycle")


def _points(report: dict[str, Any], key: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in report["series"][key]]


def _markers(report: dict[str, Any]) -> list[Marker]:
    return [Marker(float(c["step"]), c["event"], EVENT_COLORS[c["event"]],
                   f"step {c['step']}: {c['event']} {c.get('blueprint') or c.get('kind') or ''} {c['where']}".strip())
            for c in report["changes"] if isinstance(c.get("event"), str) and c["event"] in EVENT_COLORS
            and isinstance(c.get("step"), int)]


def render_all(report: dict[str, Any]) -> dict[str, str]:
    """``{plot id: svg text}`` in display order."""
    x_range = (0.0, float(max(report["run"]["steps"] or 0, 1)))
    markers = _markers(report)
    loss = line_chart("plot-loss", "Loss (train and validation) with morphogenetic events", [
        Series("train loss", _points(report, "loss"), SERIES_COLORS["loss"]),
        Series("val loss", _points(report, "val_loss"), SERIES_COLORS["val_loss"], dashed=True)], markers, x_range)
    accuracy = line_chart("plot-accuracy", "Validation accuracy with morphogenetic events", [
        Series("val accuracy", _points(report, "val_accuracy"), SERIES_COLORS["val_accuracy"])], markers, x_range,
        height=240)
    params = line_chart("plot-params", "Parameter count", [
        Series("parameters", _points(report, "params"), SERIES_COLORS["params"])],
        [m for m in markers if m.kind in ("germinate", "fossilize", "cull", "rollback")], x_range, height=220)
    rows = [(slot["slot"], [Bar(float(i["start"]), float(i["end"]), i["state"], STATE_COLORS[i["state"]])
                            for i in slot["intervals"] if i["state"] in STATE_COLORS])
            for slot in report["lifecycle"]]
    lifecycle = timeline("plot-lifecycle", "Seed lifecycle per slot", rows, x_range, STATE_COLORS)
    return dict(zip(PLOT_IDS, (loss, accuracy, params, lifecycle)))
