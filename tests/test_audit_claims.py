"""What `esper report` claims about a run's audit trail: "verified" only where tampering would have
been detected, and for a log nobody can check against a key, plainly that it is not tamper-evident.

Two real runs of ``recipes/quickstart.yaml`` (60 steps) are trained with ``esper train``: one without
``ESPER_SIGNING_KEY``, one with it. Each test copies one and edits the copy as a forger would: the
events rewritten with every hash recomputed (``run_helpers.rechain``), the signature kept, replaced
or removed, ``summary.json`` or ``metrics.jsonl`` edited. The run's asset repository (the other
witness of its events) is made unreachable where the test is about what the run directory alone
proves. Each test reads what the user reads: the terminal (``--verify`` and ``--verify --json``),
the report files (Markdown, HTML, JSON) and the exit code.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from esper_core.telemetry.binding import artifact_digests, summary_figures
from run_helpers import esper, esper_report, rechain, records_of

KEY = "the key the run was signed with"
QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
NO_REPOSITORY = "sqlite:////nonexistent/esper.db"
UNSIGNED = "not signed: its hash chain is internally consistent, but not tamper-evident"
HOW = "set ESPER_SIGNING_KEY when training"
UNCHECKED = "could not be checked"
VERIFIED = "chain head signature verified with ESPER_SIGNING_KEY"


def _train(root: Path, name: str, key: str | None) -> Path:
    with pytest.MonkeyPatch.context() as env:
        env.delenv("ESPER_DATABASE_URL", raising=False)
        if key is None:
            env.delenv("ESPER_SIGNING_KEY", raising=False)
        else:
            env.setenv("ESPER_SIGNING_KEY", key)
        result = esper("train", QUICKSTART, "trainer.max_steps=60", f"run.name={name}",
                       f"run.output_dir={root / 'runs'}", f"storage.workspace={root / 'workspace'}")
    assert result.exit_code == 0, result.output
    return root / "runs" / name


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("claims")
    return {"unsigned": _train(root, "unsigned", None), "signed": _train(root, "signed", KEY)}


@pytest.fixture
def copy(trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``copy(kind)``: a private copy of the unsigned or signed run; no key set, repository reachable."""
    monkeypatch.delenv("ESPER_SIGNING_KEY", raising=False)
    monkeypatch.delenv("ESPER_DATABASE_URL", raising=False)
    yield lambda kind: Path(shutil.copytree(trained[kind], tmp_path / kind))


def forge(run: Path, key: bytes | None = None, keep_signature: bool = False) -> None:
    """Rewrite an event and re-bind the run's results, every hash recomputed (re-signed with ``key``,
    or, with ``keep_signature``, the old signature left in place)."""
    old = json.loads((run / "summary.json").read_text())
    records = records_of(run)
    records[1]["seconds"] = 0.001  # kernels_ready: when the run could start training
    rechain(run, records, key)
    if keep_signature:
        summary = json.loads((run / "summary.json").read_text())
        summary["events_head_signature"] = old["events_head_signature"]
        (run / "summary.json").write_text(json.dumps(summary, indent=2))


def edit_summary(run: Path, rebind: bool = False) -> None:
    """Raise the test accuracy in summary.json; with ``rebind`` also in run_end, rechained (unsigned)."""
    summary = json.loads((run / "summary.json").read_text())
    summary["test_accuracy"] = 0.99
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    if rebind:
        records = records_of(run)
        records[-1] |= {"test_accuracy": 0.99, "summary": summary_figures(summary), "artifacts": artifact_digests(run)}
        rechain(run, records)


def verify(run: Path, *args: str) -> Result:
    result = esper_report("--verify", *args, run)
    assert "Traceback" not in result.output
    return result


def verify_json(run: Path) -> dict[str, Any]:
    return json.loads(verify(run, "--json").stdout)["runs"][0]


def report(run: Path) -> tuple[Result, dict[str, str]]:
    result = esper_report(run)
    assert "Traceback" not in result.output
    out = run / "report"
    return result, {f: (out / f"report.{f}").read_text() for f in ("md", "html", "json")}


def claims(result: Result, files: dict[str, str] | None = None) -> str:
    """Everything the user reads, as one text."""
    return result.output + "".join((files or {}).values())


# --- (a) and (b): an unsigned run, untouched or rewritten with a recomputed chain ------------------

@pytest.mark.parametrize("rewritten", [False, True])
def test_an_unsigned_run_is_said_consistent_but_not_tamper_evident(copy, monkeypatch, rewritten: bool) -> None:
    run = copy("unsigned")
    monkeypatch.setenv("ESPER_DATABASE_URL", NO_REPOSITORY)  # the run directory alone
    if rewritten:
        forge(run)
    result = verify(run)
    assert result.exit_code == 0, result.output  # not evidence of tampering
    assert UNSIGNED in result.stdout and HOW in result.stdout, result.stdout
    assert "intact" not in result.stdout and "verified" not in result.stdout, result.stdout
    as_json = verify_json(run)
    assert as_json["ok"] is True and as_json["signature"] == "unsigned" and as_json["tamper_evident"] is False
    assert UNSIGNED in as_json["evidence"]
    result, files = report(run)
    assert result.exit_code == 0, result.output
    assert "not tamper-evident" in files["md"].splitlines()[0]
    audit = json.loads(files["json"])["audit"]
    assert audit["signature"] == "unsigned" and audit["tamper_evident"] is False and UNSIGNED in audit["evidence"]
    for text in (files["md"], files["html"]):
        assert UNSIGNED in text and HOW in text and "intact" not in text and "verified" not in text


def test_the_report_says_it_did_not_consult_the_repository_copy(copy) -> None:
    """`--verify` catches an unsigned rewrite through the asset repository's copy; the report does not
    consult it, and must say so rather than pass the run without a word."""
    run = copy("unsigned")
    forge(run)
    assert verify(run).exit_code == 4
    result, files = report(run)
    assert "asset repository's copy of the events was not checked (esper report --verify checks it)" in files["md"]


# --- (c), (d), (e): a signed run with and without the key, and rewritten --------------------------

def test_a_signed_run_verified_with_the_key_is_tamper_evident(copy, monkeypatch) -> None:
    run = copy("signed")
    monkeypatch.setenv("ESPER_SIGNING_KEY", KEY)
    result = verify(run)
    assert result.exit_code == 0, result.output
    assert VERIFIED in result.stdout and "not tamper-evident" not in result.stdout
    as_json = verify_json(run)
    assert as_json["signature"] == "verified" and as_json["tamper_evident"] is True
    result, files = report(run)
    assert result.exit_code == 0, result.output
    assert "signature verified" in files["md"].splitlines()[0]
    report_json = json.loads(files["json"])
    assert report_json["audit"]["tamper_evident"] is True and VERIFIED in report_json["audit"]["evidence"]
    assert not any("verified" in w for w in report_json["warnings"]), report_json["warnings"]  # not a warning


@pytest.mark.parametrize("rewritten", [False, True])
def test_a_signed_run_without_the_key_is_said_unchecked_not_verified(copy, monkeypatch, rewritten: bool) -> None:
    run = copy("signed")
    monkeypatch.setenv("ESPER_DATABASE_URL", NO_REPOSITORY)
    if rewritten:
        forge(run, keep_signature=True)
    result = verify(run)
    assert result.exit_code == 0, result.output  # nothing found: without the key nothing can be
    assert UNCHECKED in result.stdout and "not tamper-evident" in result.stdout, result.stdout
    assert "set ESPER_SIGNING_KEY to the key the run was trained with" in result.stdout
    assert "intact" not in result.stdout and "verified" not in result.stdout.replace("not verified", "")
    as_json = verify_json(run)
    assert as_json["signature"] == "not checked" and as_json["tamper_evident"] is False
    result, files = report(run)
    assert "signature not checked" in files["md"].splitlines()[0]
    assert json.loads(files["json"])["audit"]["tamper_evident"] is False


@pytest.mark.parametrize("how", ["signature kept", "re-signed with another key"])
def test_a_rewritten_signed_run_fails_with_the_key(copy, monkeypatch, how: str) -> None:
    run = copy("signed")
    monkeypatch.setenv("ESPER_DATABASE_URL", NO_REPOSITORY)
    forge(run, key=b"the forger's own key" if how != "signature kept" else None, keep_signature=how == "signature kept")
    monkeypatch.setenv("ESPER_SIGNING_KEY", KEY)
    result = verify(run)
    assert result.exit_code == 4, result.output
    assert "events_head_signature does not match ESPER_SIGNING_KEY" in result.stderr
    assert verify_json(run)["signature"] == "failed"
    result, files = report(run)
    assert result.exit_code == 4 and "AUDIT FAILED" in files["md"].splitlines()[0]


def test_a_signed_run_whose_signature_was_removed_fails_even_without_the_key(copy, monkeypatch) -> None:
    """Removing the signature must not turn a signed run into one reported as merely unsigned: its
    run_start event records that it was signed."""
    run = copy("signed")
    monkeypatch.setenv("ESPER_DATABASE_URL", NO_REPOSITORY)
    forge(run)  # rechained, signature dropped
    result = verify(run)
    assert result.exit_code == 4, result.output
    assert "run_start event" in result.stderr and "records that the run was signed" in result.stderr
    assert "not signed:" not in result.output


# --- summary.json and metrics.jsonl edited after the run -----------------------------------------

@pytest.mark.parametrize("kind", ["unsigned", "signed"])
@pytest.mark.parametrize("edit", ["summary.json", "metrics.jsonl"])
def test_a_result_edited_after_the_run_is_named(copy, kind: str, edit: str) -> None:
    run = copy(kind)
    if edit == "summary.json":
        edit_summary(run)
    else:
        path = run / "metrics.jsonl"
        path.write_text(path.read_text().replace('"step":20', '"step":21', 1))
    result = verify(run)
    assert result.exit_code == 4, result.output
    assert f"error: {run / edit}:" in result.stderr
    result, files = report(run)
    assert result.exit_code == 4 and "AUDIT FAILED" in files["md"].splitlines()[0]


def test_an_unsigned_summary_edited_and_rebound_in_a_recomputed_chain_is_not_claimed_verified(copy,
                                                                                               monkeypatch) -> None:
    """What an unsigned run cannot prove: a summary edited along with its binding in run_end and the
    whole chain recomputed passes the run directory's checks; the output must say that it could."""
    run = copy("unsigned")
    monkeypatch.setenv("ESPER_DATABASE_URL", NO_REPOSITORY)
    edit_summary(run, rebind=True)
    result = verify(run)
    assert result.exit_code == 0, result.output
    assert UNSIGNED in result.stdout and "verified" not in result.stdout


def test_a_signed_summary_edited_and_rebound_in_a_recomputed_chain_fails_with_the_key(copy, monkeypatch) -> None:
    run = copy("signed")
    monkeypatch.setenv("ESPER_DATABASE_URL", NO_REPOSITORY)
    signature = json.loads((run / "summary.json").read_text())["events_head_signature"]
    edit_summary(run, rebind=True)
    summary = json.loads((run / "summary.json").read_text()) | {"events_head_signature": signature}
    (run / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setenv("ESPER_SIGNING_KEY", KEY)
    result = verify(run)
    assert result.exit_code == 4 and "events_head_signature does not match" in result.stderr, result.output


# --- a comparison of two runs ---------------------------------------------------------------------

def test_a_comparison_says_which_run_is_tamper_evident(copy, monkeypatch, tmp_path: Path) -> None:
    unsigned, signed = copy("unsigned"), copy("signed")
    monkeypatch.setenv("ESPER_DATABASE_URL", NO_REPOSITORY)
    result = esper_report(signed, unsigned, "--out", tmp_path / "vs")
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "vs" / "comparison.md").read_text()
    assert markdown.splitlines()[0].endswith("audits passed, not tamper-evident"), markdown.splitlines()[0]
    assert UNSIGNED in markdown and UNCHECKED in markdown
    runs = json.loads((tmp_path / "vs" / "comparison.json").read_text())["runs"]
    assert [run["tamper_evident"] for run in runs] == [False, False]
    shutil.rmtree(unsigned)
    shutil.copytree(signed, unsigned)
    monkeypatch.setenv("ESPER_SIGNING_KEY", KEY)
    result = esper_report(signed, unsigned, "--out", tmp_path / "vs")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "vs" / "comparison.md").read_text().splitlines()[0].endswith("audits passed, signatures verified")
