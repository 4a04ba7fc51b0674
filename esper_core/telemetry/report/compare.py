"""Two runs side by side: identities, final metrics with their differences, seeds, the recipe
settings that differ, and both runs' curves (drawn overlaid by :func:`.plots.render_comparison`).

Built from the two runs' own report dicts (:func:`.content.build`), so a comparison never says
anything about a run that its own report does not.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from esper_core.redact import redacted_url
from esper_core.telemetry.report.content import build
from esper_core.telemetry.report.load import RunFiles
from esper_core.telemetry.report.tables import Table, fmt
from esper_core.telemetry.run import build_info

SCHEMA = "esper-comparison/1"
LABELS = ("A", "B")
FINAL_METRICS = ("val_loss", "test_loss", "params_initial", "params_final")
"""Compared for every pair of runs, after the task's own metric (``val_<metric>``, ``test_<metric>``)."""


def compare(files_a: RunFiles, files_b: RunFiles) -> dict[str, Any]:
    """The comparison of run A with run B as one JSON-ready dict (``comparison.json``)."""
    reports = [build(files_a), build(files_b)]
    runs = [_run(label, report) for label, report in zip(LABELS, reports)]
    return {
        "schema": SCHEMA,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "generated_by": build_info(),
        "runs": runs,
        "metric": reports[0]["final"]["metric"],
        "metrics": _metrics(reports),
        "seeds": _keyed_counts([r["final"].get("seeds") or {} for r in reports], "state"),
        "kernels": _keyed_counts([Counter(f"{k['blueprint']} ({k['outcome']})" for k in r["kernels"])
                                  for r in reports], "blueprint"),
        "recipe_differences": recipe_differences(files_a.recipe, files_b.recipe),
        "series": {label: report["series"] for label, report in zip(LABELS, reports)},
        "changes": {label: report["changes"] for label, report in zip(LABELS, reports)},
        "steps": max(int(report["run"]["steps"] or 0) for report in reports),
    }


def _run(label: str, report: dict[str, Any]) -> dict[str, Any]:
    run, audit = report["run"], report["audit"]
    ok = bool(audit["ok"] and audit["recipe_ok"])
    # The directory's name, not run.name: a rerun of one recipe keeps the name and gets NAME-2.
    return {"label": f"{label} ({Path(run['dir']).name})", "name": run["name"], "dir": run["dir"],
            "recipe_sha256": run["recipe_sha256"], "seed": run["seed"], "steps": run["steps"],
            "device": run["device"], "finished": run["finished"], "wall_time_s": run["wall_time_s"],
            "versions": run["versions"], "audit_ok": ok,
            "audit_detail": audit["detail"] if audit["recipe_ok"] else f"{audit['detail']}; {audit['recipe_detail']}",
            "tamper_evident": audit["tamper_evident"], "audit_evidence": audit["evidence"]}


def _metrics(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    metric = reports[0]["final"]["metric"]
    for key in dict.fromkeys((f"val_{metric}", f"test_{metric}", *FINAL_METRICS)):  # a custom task's metric: loss
        a, b = (r["final"].get(key) for r in reports)
        rows.append({"metric": key, "A": a, "B": b, "difference": _difference(a, b)})
    a, b = (r["run"]["wall_time_s"] for r in reports)
    rows.append({"metric": "wall_time_s", "A": a, "B": b, "difference": _difference(a, b)})
    return rows


def _difference(a: Any, b: Any) -> float | int | None:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return b - a if numbers else None


def _keyed_counts(counts: list[Any], key: str) -> list[dict[str, Any]]:
    names = sorted({name for c in counts for name in c})
    return [{key: name, "A": counts[0].get(name, 0), "B": counts[1].get(name, 0)} for name in names]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values (a recipe's lists are settings, not sections)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def recipe_differences(recipe_a: dict[str, Any], recipe_b: dict[str, Any]) -> list[dict[str, Any]]:
    """Every recipe key (dotted) whose value differs between the two resolved recipes. A URL is shown
    without its password or secret query parameters (``storage.database_url``,
    ``telemetry.pushgateway_url``): the comparison is a document to hand on, the recipe's secret is not;
    a key whose two values differ only there is still listed."""
    a, b = flatten(recipe_a), flatten(recipe_b)
    return [{"key": key, "A": _shown(a.get(key)), "B": _shown(b.get(key))}
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def _shown(value: Any) -> Any:
    return redacted_url(value) if isinstance(value, str) and "://" in value else value


def comparison_title(comparison: dict[str, Any]) -> str:
    a, b = comparison["runs"]
    evident = [run["label"] for run in (a, b) if run["tamper_evident"]]
    if not (a["audit_ok"] and b["audit_ok"]):
        verdict = "AUDIT FAILED"
    elif len(evident) == 2:
        verdict = "audits passed, signatures verified"
    else:  # "audits passed" alone would read as proof for a log anyone could have rewritten
        verdict = f"audits passed, only {evident[0]} tamper-evident" if evident else "audits passed, not tamper-evident"
    return f"Comparison: {a['label']} vs {b['label']}, {verdict}"


def comparison_tables(comparison: dict[str, Any]) -> list[Table]:
    """The comparison's sections as format-neutral tables."""
    a, b = comparison["runs"]
    fields = [("run directory", "dir"), ("recipe sha256", "recipe_sha256"), ("seed", "seed"), ("steps", "steps"),
              ("device", "device"), ("finished", "finished"), ("wall time (s)", "wall_time_s")]
    identity = [[name, fmt(a[key]), fmt(b[key])] for name, key in fields]
    identity += [[name, fmt(a["versions"].get(key)), fmt(b["versions"].get(key))]
                 for name, key in (("esper", "esper_version"), ("torch", "torch_version"))]
    identity.append(["audit", a["audit_detail"], b["audit_detail"]])
    identity.append(["tamper evidence", a["audit_evidence"] or "-", b["audit_evidence"] or "-"])
    metrics = [[m["metric"].replace("_", " "), fmt(m["A"]), fmt(m["B"]), _signed(m["difference"])]
               for m in comparison["metrics"]]
    seeds = [[s["state"], fmt(s["A"]), fmt(s["B"])] for s in comparison["seeds"]]
    kernels = [[k["blueprint"], fmt(k["A"]), fmt(k["B"])] for k in comparison["kernels"]]
    differences = [[d["key"], _setting(d["A"]), _setting(d["B"])] for d in comparison["recipe_differences"]]
    columns = ["", a["label"], b["label"]]
    return [
        Table("Runs", ["field", *columns[1:]], identity),
        Table("Final metrics", ["metric", *columns[1:], "B - A"], metrics),
        Table("Seeds at the end, by state", ["state", *columns[1:]], seeds, empty="no seed slots in either run"),
        Table("Seeds grown, by blueprint and outcome", ["blueprint (outcome)", *columns[1:]], kernels,
              empty="neither run grew a seed"),
        Table("Recipe settings that differ", ["key", *columns[1:]], differences,
              empty="none: both runs used the same settings"),
    ]


def _signed(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:+,}" if isinstance(value, int) else f"{value:+.4g}"


def _setting(value: Any) -> str:
    return "(not set)" if value is None else value if isinstance(value, str) else json.dumps(value)
