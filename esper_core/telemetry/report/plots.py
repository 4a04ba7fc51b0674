"""The report's four plots, drawn from the report dict: loss, validation accuracy, parameters, seed slots.

Every morphogenetic event (germinate, fossilize, cull, rollback, anomaly, checkpoint...) is marked
on the loss and accuracy plots, so a change in a curve can be read against the change in the model
that preceded it.
"""

from __future__ import annotations

from typing import Any

from esper_core.telemetry.report.svg import Bar, Marker, Series, line_chart, timeline

SERIES_COLORS = {"loss": "#1f77b4", "val_loss": "#ff7f0e", "val_metric": "#2ca02c", "params": "#9467bd"}
EVENT_COLORS = {"germinate": "#17becf", "blend": "#bcbd22", "fossilize": "#006400", "cull": "#d62728",
                "rollback": "#8b0000", "anomaly": "#e377c2", "checkpoint": "#7f7f7f", "run_resume": "#000000"}
"""Marked events; the other lifecycle steps (incubate, probation, reopen) show in the slot timeline."""
RUN_COLORS = ("#1f77b4", "#ff7f0e")
"""Curves of run A and run B in a comparison (train loss solid, validation loss dashed)."""
STATE_COLORS = {"germinated": "#c7c7c7", "training": "#aec7e8", "blending": "#ffbb78", "probation": "#dbdb8d",
                "fossilized": "#98df8a", "culled": "#d62728", "rolled_back": "#8b0000"}

PLOT_IDS = ("plot-loss", "plot-metric", "plot-params", "plot-lifecycle")
SCALES = ("log", "linear")
"""Choices for the loss axis; ``log`` is the default (see :mod:`.svg`)."""


def _points(report: dict[str, Any], key: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in report["series"][key]]


def _markers(changes: list[dict[str, Any]], run: str = "") -> list[Marker]:
    prefix = f"{run}: " if run else ""
    return [Marker(float(c["step"]), c["event"], EVENT_COLORS[c["event"]],
                   f"{prefix}step {c['step']}: {c['event']} {c.get('blueprint') or c.get('kind') or ''} "
                   f"{c['where']}".strip())
            for c in changes if isinstance(c.get("event"), str) and c["event"] in EVENT_COLORS
            and isinstance(c.get("step"), int)]


def render_all(report: dict[str, Any], loss_scale: str = "log") -> dict[str, str]:
    """``{plot id: svg text}`` in display order; ``loss_scale`` is one of :data:`SCALES`."""
    x_range = (0.0, float(max(report["run"]["steps"] or 0, 1)))
    markers = _markers(report["changes"])
    loss = line_chart("plot-loss", "Loss (train and validation) with morphogenetic events", [
        Series("train loss", _points(report, "loss"), SERIES_COLORS["loss"]),
        Series("val loss", _points(report, "val_loss"), SERIES_COLORS["val_loss"], dashed=True)], markers, x_range,
        y_label="loss", log_y=loss_scale == "log")
    name = report["final"]["metric"].replace("_", " ")
    accuracy = line_chart("plot-metric", f"Validation {name} with morphogenetic events", [
        Series(f"val {name}", _points(report, "val_metric"), SERIES_COLORS["val_metric"])], markers, x_range,
        y_label=name, height=240)
    params = line_chart("plot-params", "Parameter count", [
        Series("parameters", _points(report, "params"), SERIES_COLORS["params"])],
        [m for m in markers if m.kind in ("germinate", "fossilize", "cull", "rollback")], x_range,
        y_label="parameters", height=220)
    rows = [(slot["slot"], [Bar(float(i["start"]), float(i["end"]), i["state"], STATE_COLORS[i["state"]])
                            for i in slot["intervals"] if i["state"] in STATE_COLORS])
            for slot in report["lifecycle"]]
    lifecycle = timeline("plot-lifecycle", "Seed lifecycle per slot", rows, x_range, STATE_COLORS)
    return dict(zip(PLOT_IDS, (loss, accuracy, params, lifecycle)))


def render_comparison(comparison: dict[str, Any], loss_scale: str = "log") -> dict[str, str]:
    """The curves of both runs overlaid (run A then run B, each in its colour), with both runs' events."""
    x_range = (0.0, float(max(comparison["steps"], 1)))
    runs = list(zip(comparison["runs"], comparison["series"].values(), comparison["changes"].values(), RUN_COLORS))
    markers = [m for run, _, changes, _ in runs for m in _markers(changes, run["label"])]

    def series(key: str, name: str, dashed: bool = False) -> list[Series]:
        return [Series(f"{run['label']} {name}", [(float(x), float(y)) for x, y in points[key]], color, dashed)
                for run, points, _, color in runs]

    loss = line_chart("compare-loss", "Loss of both runs (train solid, validation dashed)",
                      series("loss", "train loss") + series("val_loss", "val loss", dashed=True), markers, x_range,
                      y_label="loss", log_y=loss_scale == "log")
    name = comparison["metric"].replace("_", " ")
    accuracy = line_chart("compare-metric", f"Validation {name} of both runs", series("val_metric", f"val {name}"),
                          markers, x_range, y_label=name, height=240)
    growth = [m for m in markers if m.kind in ("germinate", "fossilize", "cull", "rollback")]
    params = line_chart("compare-params", "Parameter count of both runs", series("params", "parameters"), growth,
                        x_range, y_label="parameters", height=220)
    return {"compare-loss": loss, "compare-metric": accuracy, "compare-params": params}
