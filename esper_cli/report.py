"""`esper report RUN [RUN_B] [--out DIR] [--format md,html,json] [--loss-scale log|linear]` and
`esper report --verify [--json] RUN [RUN_B]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from esper_cli.errors import reported
from esper_core.errors import ConfigError, EsperError, Problem
from esper_core.safe_read import foreign
from esper_core.telemetry.audit import AuditError, AuditResult, RunVerification, verify_run
from esper_core.telemetry.report import FORMATS, SCALES, write_comparison, write_report


@reported
def report(
    runs: list[Path] = typer.Argument(..., help="A run directory (runs/NAME), or two to compare side by side.",
                                      show_default=False, metavar="RUN [RUN_B]"),
    out: Path = typer.Option(None, "--out", help="Directory for the report files [default: RUN/report; for two "
                             "runs RUN/report/vs-NAME_B].", show_default=False),
    formats: str = typer.Option(",".join(FORMATS), "--format", help="Comma-separated formats: md, html, json."),
    loss_scale: str = typer.Option("log", "--loss-scale", help=f"Loss axis of the plots: {' or '.join(SCALES)}."),
    verify: bool = typer.Option(False, "--verify", help="Only verify each run: the event log's hash chain and its "
                                "anchor in summary.json, the recipe's hashes, the final artifacts and summary "
                                "figures bound in run_end, the head signature (with ESPER_SIGNING_KEY) and the asset "
                                "repository's copy of the events, and say whether the log is tamper-evident (only "
                                "a signature checked with the key proves it); exit 4 naming the first bad record "
                                "or file."),
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
    """Upload the report to the run's artifact store, when its recipe names one (a failure only warns). The
    recipe is read only when it is a regular file: the recipe loader opens what it is given, and a FIFO
    here blocked the report forever; the audit above names what stands there."""
    from esper_core.artifacts.publish import publish_files
    from esper_core.recipe.load import load_recipe

    saved = run / "recipe.yaml"
    if foreign(saved) is not None:
        return
    try:
        storage = load_recipe(saved, check_data=False).recipe.storage
    except EsperError:  # a missing or edited recipe: the audit above reports it
        return
    publish_files(run, paths, storage)


def _verify(runs: list[Path], as_json: bool) -> None:
    """Verify each run; print one line per run, what its log proves against tampering and notes of what
    could not be checked, or one JSON object (``ok`` and a result per run)."""
    results = [(run, verify_run(run)) for run in runs]
    if as_json:
        print(json.dumps({"ok": all(v.ok for _, v in results),
                          "runs": [verification_json(run, v) for run, v in results]}, indent=2))
    else:
        for run, verification in results:
            where = "" if len(runs) == 1 else f"{run}: "
            if verification.ok:
                print(f"ok: {where}{verification.chain.describe()}")
            evidence = [verification.evidence] if verification.evidence else []
            for note in evidence + verification.notes:  # tamper evidence; what could not be checked, and why
                print(f"note: {where}{note}", file=sys.stdout if verification.ok else sys.stderr)
    _fail_if_broken([(v.chain, v.problems) for _, v in results])


def verification_json(run: Path, verification: RunVerification) -> dict[str, object]:
    """One run's verification: the event chain's audit (as in report.json), problems, notes, and the
    signature's state with what it proves (``tamper_evident`` only where a rewrite would be detected)."""
    chain = verification.chain
    problems = ([str(chain.first_break.problem(chain.name))] if chain.first_break else []) + \
        [str(p) for p in verification.problems]
    return {"run": str(run), "ok": verification.ok, "events": chain.to_json(), "problems": problems,
            "signature": verification.signature, "tamper_evident": verification.tamper_evident,
            "evidence": verification.evidence, "notes": verification.notes}


def _fail_if_broken(audits: list[tuple[AuditResult, list[Problem]]]) -> None:
    problems = [p for result, others in audits
                for p in ([result.first_break.problem(result.name)] if result.first_break else []) + others]
    if problems:
        raise AuditError(problems)
