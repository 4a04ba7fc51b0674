"""The report's sections as format-neutral tables, so Markdown and HTML show the same rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    empty: str = "none"


def _s(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_s(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_s(v) for v in value)
    return str(value)


def headline(report: dict[str, Any]) -> str:
    run, audit = report["run"], report["audit"]
    status = "finished" if run["finished"] else "unfinished"
    verdict = "audit passed" if audit["ok"] and audit["recipe_ok"] else "AUDIT FAILED"
    return f"Run {run['name']}: {status}, {_s(run['steps'])} steps, {verdict}"


def sections(report: dict[str, Any]) -> list[Table]:
    run, audit, final = report["run"], report["audit"], report["final"]
    versions = run["versions"]
    identity = [
        ["run directory", run["dir"]], ["recipe sha256", _s(run["recipe_sha256"])], ["seed", _s(run["seed"])],
        ["data", _s(run["data"])], ["model", _s(run["model"])], ["device", _s(run["device"])],
        ["esper", _s(versions.get("esper_version"))], ["torch", _s(versions.get("torch_version"))],
        ["python", _s(versions.get("python_version"))], ["started (UTC)", _s(run["started_at"])],
        ["ended (UTC)", _s(run["ended_at"])], ["wall time (s)", _s(run["wall_time_s"])], ["steps", _s(run["steps"])],
        ["metrics endpoint", _s(run["metrics_url"])],
    ]
    results = [[k.replace("_", " "), _s(final[k])] for k in ("val_accuracy", "test_accuracy", "val_loss", "test_loss",
                                                            "params_initial", "params_final", "seeds")]
    budgets = [[b["key"], b["what"], _s(b["limit"]), _s(b["used"]),
                "-" if b["within"] is None else ("within" if b["within"] else "EXCEEDED")] for b in report["budgets"]]
    changes = [[_s(c.get("seq")), _s(c.get("step")), _s(c.get("event")) + (f" ({c['kind']})" if "kind" in c else ""),
                c["where"] or "-", _s(c.get("blueprint")),
                c["detail"] or "-"] for c in report["changes"]]
    kernels = [[_s(k["address"]), _s(k["blueprint"]), f"{k['layer']}#{k['slot']}", _s(k["params"]), _s(k["step"]),
                k["outcome"]] for k in report["kernels"]]
    checkpoints = [[c["name"], _s(c["step"]), _s(c["bytes"]), _s(c["latest"]), _s(c["complete"])]
                   for c in report["checkpoints"]]
    anomalies = [[_s(a.get("seq")), _s(a.get("step")), _s(a.get("kind")), _s(a.get("reason"))]
                 for a in report["anomalies"]]
    return [
        Table("Run identity", ["field", "value"], identity),
        Table("Audit", ["check", "result"], [["event chain", audit["detail"]], ["records", _s(audit["records"])],
                                             ["head", audit["head"]], ["recipe", audit["recipe_detail"]]]),
        Table("Final metrics", ["metric", "value"], results, empty="the run did not finish: no final metrics"),
        Table("Budgets", ["recipe key", "what", "limit", "used", "verdict"], budgets),
        Table("Change history", ["seq", "step", "event", "slot", "blueprint", "reason and measured effect"], changes,
              empty="no changes: the model never grew"),
        Table("Kernels used", ["address", "blueprint", "slot", "params", "step", "outcome"], kernels,
              empty="none: no seed was germinated"),
        Table("Checkpoints", ["name", "step", "bytes", "latest", "complete"], checkpoints,
              empty="none: the run has no checkpoints/ directory or it is empty"),
        Table("Anomalies", ["seq", "step", "kind", "reason"], anomalies, empty="none detected"),
        Table("Warnings", ["warning"], [[w] for w in report["warnings"]], empty="none"),
    ]
