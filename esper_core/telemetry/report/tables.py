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


def fmt(value: Any) -> str:
    """A value as a table cell: ``-`` for none, thousands separators, 4 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(fmt(v) for v in value)
    return str(value)


VERDICTS = {"verified": "audit passed, signature verified", "not checked": "audit passed, signature not checked",
            "unsigned": "audit passed, unsigned: not tamper-evident",
            "unfinished": "audit passed, unfinished: not tamper-evident"}
"""The headline's verdict on a sound log by its signature's state: "audit passed" alone would read
as proof for a log that anyone could have rewritten."""


def verdict(audit: dict[str, Any]) -> str:
    """The audit's verdict in a few words (the report's headline, a comparison's per-run label)."""
    if not (audit["ok"] and audit["recipe_ok"]):
        return "AUDIT FAILED"
    return VERDICTS.get(audit["signature"], "audit passed")


def headline(report: dict[str, Any]) -> str:
    run = report["run"]
    status = "finished" if run["finished"] else "unfinished"
    return f"Run {run['name']}: {status}, {fmt(run['steps'])} steps, {verdict(report['audit'])}"


def sections(report: dict[str, Any]) -> list[Table]:
    run, audit, final = report["run"], report["audit"], report["final"]
    versions = run["versions"]
    identity = [
        ["run directory", run["dir"]], ["recipe sha256", fmt(run["recipe_sha256"])], ["seed", fmt(run["seed"])],
        ["data", fmt(run["data"])], ["model", fmt(run["model"])], ["device", fmt(run["device"])],
        ["esper", fmt(versions.get("esper_version"))], ["torch", fmt(versions.get("torch_version"))],
        ["python", fmt(versions.get("python_version"))], ["started (UTC)", fmt(run["started_at"])],
        ["ended (UTC)", fmt(run["ended_at"])], ["wall time (s)", fmt(run["wall_time_s"])], ["steps", fmt(run["steps"])],
        ["metrics endpoint", fmt(run["metrics_url"])],
    ]
    metric = final["metric"]
    headline = (f"val_{metric}", f"test_{metric}")
    results = [[k.replace("_", " "), fmt(final[k])] for k in headline]
    if final.get("seeds_muted"):  # what the grown seeds are worth: the same model with every seed silent
        results += [[f"{k.replace('_', ' ')} with every seed muted", fmt(v)] for k, v in final["seeds_muted"].items()]
    # a custom task's metric is the loss: its rows are already above
    results += [[k.replace("_", " "), fmt(final[k])]
                for k in ("val_loss", "test_loss", "params_initial", "params_final", "seeds") if k not in headline]
    budgets = [[b["key"], b["what"], fmt(b["limit"]), fmt(b["used"]),
                "-" if b["within"] is None else ("within" if b["within"] else "EXCEEDED")] for b in report["budgets"]]
    changes = [[fmt(c.get("seq")), fmt(c.get("step")), fmt(c.get("event")) + (f" ({c['kind']})" if "kind" in c else ""),
                c["where"] or "-", fmt(c.get("blueprint")),
                c["detail"] or "-"] for c in report["changes"]]
    kernels = [[fmt(k["address"]), fmt(k["blueprint"]), f"{k['layer']}#{k['slot']}", fmt(k["params"]), fmt(k["step"]),
                k["outcome"]] for k in report["kernels"]]
    checkpoints = [[c["name"], fmt(c["step"]), fmt(c["bytes"]), fmt(c["latest"]), fmt(c["complete"])]
                   for c in report["checkpoints"]]
    code = report["code"]
    modules = [[m["module"], fmt(m["field"]), m["path"], m["sha256"], m["detail"]] for m in code["modules"]]
    anomalies = [[fmt(a.get("seq")), fmt(a.get("step")), fmt(a.get("kind")), fmt(a.get("reason"))]
                 for a in report["anomalies"]]
    return [
        Table("Run identity", ["field", "value"], identity),
        Table("Audit", ["check", "result"], [["event chain", audit["detail"]], ["records", fmt(audit["records"])],
                                             ["head", audit["head"]], ["recipe", audit["recipe_detail"]],
                                             ["tamper evidence", audit["evidence"] or "-"],
                                             ["factory code", code["detail"]]]),
        Table("Factory code", ["module", "recipe key", "file", "recorded sha256", "file now"], modules,
              empty=code["detail"]),
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
