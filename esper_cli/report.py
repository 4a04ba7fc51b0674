"""`esper report RUN_DIR [--out DIR] [--format md,html,json]` and `esper report --verify RUN_DIR`."""

from __future__ import annotations

from pathlib import Path

import typer

from esper_cli.errors import reported
from esper_core.errors import ConfigError, Problem
from esper_core.telemetry.audit import AuditError, AuditResult, audit, recipe_problem
from esper_core.telemetry.events import RunDirEvents
from esper_core.telemetry.report import FORMATS, write_report


@reported
def report(
    run: Path = typer.Argument(..., help="Run directory (runs/NAME).", show_default=False),
    out: Path = typer.Option(None, "--out", help="Directory for the report files [default: RUN/report].",
                             show_default=False),
    formats: str = typer.Option(",".join(FORMATS), "--format", help="Comma-separated formats: md, html, json."),
    verify: bool = typer.Option(False, "--verify", help="Only check the event log's hash chain, its anchor in "
                                "summary.json and the recipe's hash; exit 4 naming the first bad record."),
) -> None:
    """Write a compliance report of a run, or compare two runs.

    Exit 4 if a run's history fails the audit (the report is still written).
    """
    if verify:
        result = audit(RunDirEvents(run))
        _fail_if_broken(result, recipe_problem(run))
        print(f"ok: {result.describe()}")
        return
    chosen = tuple(dict.fromkeys(f.strip() for f in formats.split(",") if f.strip()))
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise ConfigError(Problem("command line", f"unknown format {', '.join(unknown) or '(none given)'} "
                                  f"(choose from {', '.join(FORMATS)})", field="--format"))
    written = write_report(run, out, chosen)
    for path in written.paths:
        print(f"wrote {path}")
    _fail_if_broken(written.audit, written.recipe_problem)


def _fail_if_broken(result: AuditResult, recipe: Problem | None) -> None:
    problems = ([result.first_break.problem(result.name)] if result.first_break else []) + ([recipe] if recipe else [])
    if problems:
        raise AuditError(problems)
