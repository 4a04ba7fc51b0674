"""`esper report RUN [RUN_B] [--out DIR] [--format md,html,json] [--loss-scale log|linear]` and
`esper report --verify [--json] RUN [RUN_B]`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from esper_cli.errors import reported
from esper_core.errors import ConfigError, EsperError, Problem
from esper_core.telemetry.audit import AuditError, AuditResult, audit, recipe_problem
from esper_core.telemetry.events import RunDirEvents
from esper_core.telemetry.report import FORMATS, SCALES, write_comparison, write_report


@reported
def report(
    runs: list[Path] = typer.Argument(..., help="A run directory (runs/NAME), or two to compare side by side.",
                                      show_default=False, metavar="RUN [RUN_B]"),
    out: Path = typer.Option(None, "--out", help="Directory for the report files [default: RUN/report; for two "
                             "runs RUN/report/vs-NAME_B].", show_default=False),
    formats: str = typer.Option(",".join(FORMATS), "--format", help="Comma-separated formats: md, html, json."),
    loss_scale: str = typer.Option("log", "--loss-scale", help=f"Loss axis of the plots: {' or '.join(SCALES)}."),
    verify: bool = typer.Option(False, "--verify", help="Only check each run's event hash chain, its anchor in "
                                "summary.json and the recipe's hash; exit 4 naming the first bad record."),
    as_json: bool = typer.Option(False, "--json", help="With --verify: print the verification result as JSON on "
                                 "stdout."),
) -> None:
    """Write a compliance report of a run, or compare two runs.

    Exit 4 if a run's history fails the audit (the report is still written).
    """
    if len(runs) > 2:
        raise ConfigError(Problem("command line", f"{len(runs)} run directories given: report takes one, or two "
                                  "to compare", field="RUN"))
    if as_json and not verify:
        raise ConfigError(Problem("command line", "--json applies to --verify; reports are written with "
                                  "--format json", field="--json"))
    if loss_scale not in SCALES:
        raise ConfigError(Problem("command line", f"unknown scale {loss_scale} (choose from {', '.join(SCALES)})",
                                  field="--loss-scale"))
    if verify:
        _verify(runs, as_json)
        return
    chosen = tuple(dict.fromkeys(f.strip() for f in formats.split(",") if f.strip()))
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise ConfigError(Problem("command line", f"unknown format {', '.join(unknown) or '(none given)'} "
                                  f"(choose from {', '.join(FORMATS)})", field="--format"))
    if len(runs) == 2:
        written = write_comparison(runs[0], runs[1], out, chosen, loss_scale)
    else:
        written = write_report(runs[0], out, chosen, loss_scale)
    for path in written.paths:
        print(f"wrote {path}")
    _publish(runs[0], written.paths)
    _fail_if_broken(written.audits)


def _publish(run: Path, paths: list[Path]) -> None:
    """Upload the report to the run's artifact store, when its recipe names one (a failure only warns)."""
    from esper_core.artifacts.publish import publish_files
    from esper_core.recipe.load import load_recipe

    try:
        storage = load_recipe(run / "recipe.yaml").recipe.storage
    except EsperError:  # a missing or edited recipe: the audit above reports it
        return
    publish_files(run, paths, storage)


def _verify(runs: list[Path], as_json: bool) -> None:
    """Audit each run; print one line per run, or one JSON object (``ok`` and a result per run)."""
    results = [(run, audit(RunDirEvents(run)), recipe_problem(run)) for run in runs]
    if as_json:
        print(json.dumps({"ok": all(r.ok and p is None for _, r, p in results),
                          "runs": [verification_json(run, result, problem) for run, result, problem in results]},
                         indent=2))
    else:
        for run, result, problem in results:
            if result.ok and problem is None:
                print(f"ok: {result.describe()}" if len(runs) == 1 else f"ok: {run}: {result.describe()}")
    _fail_if_broken([(result, problem) for _, result, problem in results])


def verification_json(run: Path, result: AuditResult, problem: Problem | None) -> dict[str, object]:
    """One run's verification: the event chain's audit (as in report.json) and the recipe check."""
    problems = ([str(result.first_break.problem(result.name))] if result.first_break else []) + \
        ([str(problem)] if problem else [])
    return {"run": str(run), "ok": result.ok and problem is None, "events": result.to_json(),
            "recipe_ok": problem is None, "problems": problems}


def _fail_if_broken(audits: list[tuple[AuditResult, Problem | None]]) -> None:
    problems = [p for result, recipe in audits
                for p in ([result.first_break.problem(result.name)] if result.first_break else []) + ([recipe] if recipe else [])]
    if problems:
        raise AuditError(problems)
