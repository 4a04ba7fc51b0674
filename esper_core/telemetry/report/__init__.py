"""``esper report``: a run's compliance report in Markdown, HTML (with plots) and JSON.

:func:`write_report` reads the run directory (:mod:`.load`), audits its event chain, builds one
report dict (:mod:`.content`) and renders the chosen formats from it (:mod:`.render`,
:mod:`.plots`). The report is written even when the audit fails, saying so on its first line, so
a tampered run can still be inspected; the caller decides the exit code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper_core.errors import Problem
from esper_core.telemetry.audit import AuditResult

from esper_core.telemetry.report.content import build
from esper_core.telemetry.report.load import load_run
from esper_core.telemetry.report.plots import render_all
from esper_core.telemetry.report.render import html, markdown

FORMATS = ("md", "html", "json")


@dataclass(frozen=True)
class Written:
    """What :func:`write_report` produced, and the integrity findings the caller turns into an exit code."""

    report: dict[str, Any]
    paths: list[Path]
    audit: AuditResult
    problems: list[Problem]


def write_report(run_dir: Path, out_dir: Path | None = None, formats: tuple[str, ...] = FORMATS) -> Written:
    """Write the report files (``RUN/report/`` unless ``out_dir``) in the chosen formats."""
    files = load_run(run_dir)
    report = build(files)
    out = out_dir or run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    plots = render_all(report) if {"md", "html"} & set(formats) else {}
    if "json" in formats:
        written.append(_write(out / "report.json", json.dumps(_finite(report), indent=2, allow_nan=False)))
    if "html" in formats:
        written.append(_write(out / "report.html", html(report, plots)))
    if "md" in formats:
        svg_files = {plot_id: f"{plot_id}.svg" for plot_id in plots}
        for plot_id, name in svg_files.items():
            written.append(_write(out / name, plots[plot_id] + "\n"))
        written.append(_write(out / "report.md", markdown(report, svg_files)))
    return Written(report, written, files.audit, files.integrity)


def _finite(value: Any) -> Any:
    """NaN and infinities (a diverged loss) become ``null``: strict JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
