"""``esper report``: a run's compliance report in Markdown, HTML (with plots) and JSON, and the
side-by-side comparison of two runs.

:func:`write_report` reads the run directory (:mod:`.load`), audits its event chain, builds one
report dict (:mod:`.content`) and renders the chosen formats from it (:mod:`.render`,
:mod:`.plots`). :func:`write_comparison` does the same for two runs (:mod:`.compare`). A report is
written even when an audit fails, saying so on its first line, so a tampered run can still be
inspected; the caller decides the exit code.

A run directory may come from someone else, so its report is never written through a link planted
in it: each file replaces whatever name is there (a link included) atomically, and a ``report/``
(or ``vs-NAME/``) directory of the run that is itself a link is refused (exit 2).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper_core.durable import replace_atomically
from esper_core.errors import Problem
from esper_core.safe_read import foreign
from esper_core.telemetry.audit import AuditResult
from esper_core.telemetry.events import RunDirError

from esper_core.telemetry.report.compare import compare, comparison_tables, comparison_title
from esper_core.telemetry.report.content import build
from esper_core.telemetry.report.load import load_run
from esper_core.telemetry.report.plots import SCALES, render_all, render_comparison
from esper_core.telemetry.report.render import Note, html, markdown
from esper_core.telemetry.report.tables import headline, sections

FORMATS = ("md", "html", "json")
__all__ = ["FORMATS", "SCALES", "Written", "write_comparison", "write_report"]


@dataclass(frozen=True)
class Written:
    """What was written, and the integrity findings (one per run) the caller turns into an exit code."""

    report: dict[str, Any]
    paths: list[Path]
    audits: list[tuple[AuditResult, list[Problem]]]


def write_report(run_dir: Path, out_dir: Path | None = None, formats: tuple[str, ...] = FORMATS,
                 loss_scale: str = "log") -> Written:
    """Write the report files (``RUN/report/`` unless ``out_dir``) in the chosen formats."""
    files = load_run(run_dir)
    report = build(files)
    audit = report["audit"]
    notes = [(audit["ok"] and audit["recipe_ok"], audit[k]) for k in ("detail", "recipe_detail")]
    notes += [(audit["tamper_evident"], audit["evidence"])] if audit["evidence"] else []
    code = report["code"]
    # edited or missing code is a finding shown beside the audit, not a failure of it: the verdict stands
    notes += [(all(m["state"] == "matches" for m in code["modules"]), f"factory code: {code['detail']}")] \
        if code["modules"] else []
    plots = render_all(report, loss_scale) if {"md", "html"} & set(formats) else {}
    paths = _write_formats(out_dir or _own(run_dir / "report"), "report", formats, report, headline(report), notes,
                           plots, sections(report))
    return Written(report, paths, [(files.audit, files.integrity)])


def write_comparison(run_a: Path, run_b: Path, out_dir: Path | None = None, formats: tuple[str, ...] = FORMATS,
                     loss_scale: str = "log") -> Written:
    """Write ``comparison.{md,html,json}`` for two runs (``RUN_A/report/vs-<RUN_B name>/`` unless ``out_dir``)."""
    files = (load_run(run_a), load_run(run_b))
    comparison = compare(*files)
    notes: list[Note] = [(run["audit_ok"], f"{run['label']}: {run['audit_detail']}") for run in comparison["runs"]]
    notes += [(run["tamper_evident"], f"{run['label']}: {run['audit_evidence']}") for run in comparison["runs"]
              if run["audit_evidence"]]
    plots = render_comparison(comparison, loss_scale) if {"md", "html"} & set(formats) else {}
    out = out_dir or _own(_own(run_a / "report") / f"vs-{run_b.resolve().name}")
    paths = _write_formats(out, "comparison", formats, comparison, comparison_title(comparison), notes, plots,
                           comparison_tables(comparison))
    return Written(comparison, paths, [(f.audit, f.integrity) for f in files])


def _write_formats(out: Path, stem: str, formats: tuple[str, ...], data: dict[str, Any], title: str,
                   notes: list[Note], plots: dict[str, str], tables: list[Any]) -> list[Path]:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _unwritable(out, error, directory=True) from None
    written: list[Path] = []
    if "json" in formats:
        written.append(_write(out / f"{stem}.json", json.dumps(_finite(data), indent=2, allow_nan=False)))
    if "html" in formats:
        written.append(_write(out / f"{stem}.html", html(title, notes, plots, tables)))
    if "md" in formats:
        written.append(_write(out / f"{stem}.md", markdown(title, notes, plots, tables)))
    return written


def _finite(value: Any) -> Any:
    """NaN and infinities (a diverged loss) become ``null``: strict JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _own(path: Path) -> Path:
    """``path``, a directory Esper writes inside a run, unless something put a link there."""
    if path.is_symlink():
        raise RunDirError(Problem(str(path), "a symbolic link: a report is written only into the run's own "
                                             "directory, not where a link points; remove the link"))
    return path


def _write(path: Path, text: str) -> Path:
    try:
        replace_atomically(path, text.encode("utf-8"))
    except OSError as error:
        raise _unwritable(path, error, directory=False) from None
    return path


def _unwritable(path: Path, error: OSError, directory: bool) -> RunDirError:
    """Why the report cannot be written at ``path`` (its directory, or one of its files), as one located
    error (exit 2) rather than the traceback of the mkdir or rename: most often something of someone
    else's stands there (a file where the directory belongs, a directory where ``report.md`` belongs),
    which is left as it was."""
    kind = foreign(path, directory)
    if kind is None:
        return RunDirError(Problem(str(path), f"cannot be written ({error.strerror or error})"))
    what = "the report's directory" if directory else "the report file"
    return RunDirError(Problem(str(path), f"{kind} in place of {what}: remove it, or write the report elsewhere "
                                          "with --out DIR"))
