"""`esper report RUN_DIR [--out DIR] [--format md,html,json]` and `esper report --verify RUN_DIR`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from esper_cli.errors import reported
from esper_core.errors import ConfigError, Problem
from esper_core.telemetry.audit import AuditError, AuditResult, verify_run
from esper_core.telemetry.report import FORMATS, write_report


@reported
def report(
    run: Path = typer.Argument(..., help="Run directory (runs/NAME).", show_default=False),
    out: Path = typer.Option(None, "--out", help="Directory for the report files [default: RUN/report].",
                             show_default=False),
    formats: str = typer.Option(",".join(FORMATS), "--format", help="Comma-separated formats: md, html, json."),
    verify: bool = typer.Option(False, "--verify", help="Only verify the run: the event log's hash chain and its "
                                "anchor in summary.json, the recipe's hashes, the final artifacts and summary "
                                "figures bound in run_end, the head signature (with ESPER_SIGNING_KEY) and the asset "
                                "repository's copy of the events; exit 4 naming the first bad record or file."),
) -> None:
    """Write a compliance report of a run; exit 4 if its history fails the audit (the report is still written)."""
    if verify:
        verification = verify_run(run)
        if verification.ok:
            print(f"ok: {verification.chain.describe()}")
        for note in verification.notes:  # what could not be checked, and why
            print(f"note: {note}", file=sys.stdout if verification.ok else sys.stderr)
        _fail_if_broken(verification.chain, verification.problems)
        return
    chosen = tuple(dict.fromkeys(f.strip() for f in formats.split(",") if f.strip()))
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise ConfigError(Problem("command line", f"unknown format {', '.join(unknown) or '(none given)'} "
                                  f"(choose from {', '.join(FORMATS)})", field="--format"))
    written = write_report(run, out, chosen)
    for path in written.paths:
        print(f"wrote {path}")
    _fail_if_broken(written.audit, written.problems)


def _fail_if_broken(result: AuditResult, others: list[Problem]) -> None:
    problems = ([result.first_break.problem(result.name)] if result.first_break else []) + others
    if problems:
        raise AuditError(problems)
