"""`esper report --verify`: every way of changing a stored event is caught, and named.

One real run is trained (metrics off); each test copies its directory and tampers with the copy:
editing, deleting, reordering or inserting a record anywhere, the last record included (only
summary.json's ``events_head`` can catch that one), plus a damaged line, a removed summary and an
edited recipe. Each must exit 4 with ``events.jsonl:LINE: record seq N: why`` naming the first bad
record, and no traceback. A path that is not a run directory is a usage error: exit 2.

The command is invoked in-process through a one-command Typer app, exactly as ``esper`` registers
it, so the exit code and stderr are the user's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import Result

from esper_core.telemetry.jsonl import verify_chain
from esper_core.training.interrupts import Interrupted
from esper_core.training.trainer import Trainer
from run_helpers import esper_report, finished_run

RECIPE = """\
run: {name: audited, seed: 0, device: cpu}
data: {source: digits, layout: flat, batch_size: 32}
model: {arch: mlp, widths: [16]}
seeds: {targets: ["type:Linear"], exclude: [head], per_layer: 2, blueprints: [lowrank_adapter], rank: 4,
        incubation_steps: 20, blend_steps: 20, probation_steps: 10, embargo_steps: 100000,
        fossilize_margin: -1.0}
policy: {trigger: periodic, period_steps: 30, growth_window: [0.05, 0.5], max_seeds: 4}
trainer: {max_steps: 120, lr: 0.01, eval_every: 10, log_every: 10}
telemetry: {progress: none}
"""

MIDDLE = 4
"""A record well inside the log: neither the first nor one of the last two."""

@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_run(tmp_path_factory.mktemp("audited"), RECIPE)


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run to tamper with."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def lines_of(run: Path) -> list[str]:
    return (run / "events.jsonl").read_text(encoding="utf-8").splitlines()


def rewrite(run: Path, change: Callable[[list[str]], list[str]]) -> None:
    (run / "events.jsonl").write_text("\n".join(change(lines_of(run))) + "\n", encoding="utf-8")


def edited(line: str, **fields: object) -> str:
    """The record with some fields changed, serialised exactly as the trainer writes records."""
    return json.dumps(json.loads(line) | fields, sort_keys=True, separators=(",", ":"))


def assert_names(result: Result, run: Path, line: int, seq: int, why: str) -> None:
    assert result.exit_code == 4, result.output
    assert f"error: {run / 'events.jsonl'}:{line}: record seq {seq}: " in result.stderr, result.stderr
    assert why in result.stderr, result.stderr
    assert "Traceback" not in result.output


def test_an_untouched_run_verifies(finished: Path) -> None:
    result = esper_report("--verify", finished)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: ") and "hash chain consistent" in result.stdout
    assert verify_chain(finished / "events.jsonl") is None
    first = json.loads(lines_of(finished)[0])
    assert first["versions"]["torch_version"] == torch.__version__ and "metrics_url" not in first
    assert len(lines_of(finished)) > MIDDLE + 2



def test_editing_a_record_names_it(run: Path) -> None:
    rewrite(run, lambda ls: ls[:MIDDLE] + [edited(ls[MIDDLE], params=1)] + ls[MIDDLE + 1:])
    assert_names(esper_report("--verify", run), run, MIDDLE + 1, MIDDLE, "this record was edited")


def test_editing_a_records_chain_field_names_it(run: Path) -> None:
    rewrite(run, lambda ls: ls[:MIDDLE] + [edited(ls[MIDDLE], prev="0" * 64)] + ls[MIDDLE + 1:])
    assert_names(esper_report("--verify", run), run, MIDDLE + 1, MIDDLE, "prev does not match")


def test_deleting_a_record_is_detected_where_it_was(run: Path) -> None:
    rewrite(run, lambda ls: ls[:MIDDLE] + ls[MIDDLE + 1:])
    assert_names(esper_report("--verify", run), run, MIDDLE + 1, MIDDLE + 1, "deleted, inserted or reordered")


def test_reordering_two_records_is_detected(run: Path) -> None:
    rewrite(run, lambda ls: ls[:MIDDLE] + [ls[MIDDLE + 1], ls[MIDDLE]] + ls[MIDDLE + 2:])
    assert_names(esper_report("--verify", run), run, MIDDLE + 1, MIDDLE + 1, "deleted, inserted or reordered")
    assert verify_chain(run / "events.jsonl") == MIDDLE


def test_inserting_a_well_formed_record_is_detected(run: Path) -> None:
    def forge(ls: list[str]) -> list[str]:
        prev = hashlib.sha256(ls[MIDDLE - 1].encode("utf-8")).hexdigest()
        forged = edited(ls[MIDDLE], seq=MIDDLE, prev=prev, reason="forged")
        return ls[:MIDDLE] + [forged] + ls[MIDDLE:]
    rewrite(run, forge)
    assert_names(esper_report("--verify", run), run, MIDDLE + 2, MIDDLE, "deleted, inserted or reordered")


def test_editing_the_last_record_is_caught_by_the_summary_anchor(run: Path) -> None:
    n = len(lines_of(run))
    rewrite(run, lambda ls: ls[:-1] + [edited(ls[-1], test_accuracy=1.0)])
    assert verify_chain(run / "events.jsonl") is None  # the links alone cannot see it
    assert_names(esper_report("--verify", run), run, n, n - 1, "does not match summary.json's events_head")


def test_deleting_the_last_record_is_caught_by_the_summary_anchor(run: Path) -> None:
    n = len(lines_of(run))
    rewrite(run, lambda ls: ls[:-1])
    assert verify_chain(run / "events.jsonl") is None
    assert_names(esper_report("--verify", run), run, n - 1, n - 2, "records after it were deleted")


def test_a_damaged_line_is_named(run: Path) -> None:
    rewrite(run, lambda ls: ls[:MIDDLE] + [ls[MIDDLE][: len(ls[MIDDLE]) // 2]] + ls[MIDDLE + 1:])
    assert_names(esper_report("--verify", run), run, MIDDLE + 1, MIDDLE, "not a JSON object")


def test_without_summary_the_tail_cannot_be_proven(run: Path) -> None:
    (run / "summary.json").unlink()
    n = len(lines_of(run))
    assert_names(esper_report("--verify", run), run, n, n - 1, "summary.json has no events_head")


def test_an_edited_recipe_is_detected(run: Path) -> None:
    recipe = run / "recipe.yaml"
    recipe.write_text(recipe.read_text(encoding="utf-8").replace("max_seeds: 4", "max_seeds: 40"), encoding="utf-8")
    result = esper_report("--verify", run)
    assert result.exit_code == 4, result.output
    assert f"error: {recipe}: sha256 " in result.stderr and "recipe.sha256" in result.stderr


@pytest.mark.parametrize("kind, message", [("missing", "not a directory"), ("a file", "not a directory"),
                                           ("empty directory", "not a run directory: it has no events.jsonl")])
def test_a_path_that_is_not_a_run_directory_is_exit_2(tmp_path: Path, kind: str, message: str) -> None:
    path = tmp_path / "target"
    if kind == "a file":
        path.write_text("x", encoding="utf-8")
    elif kind == "empty directory":
        path.mkdir()
    for args in (("--verify",), ()):
        result = esper_report(*args, path)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and message in result.stderr
        assert "Traceback" not in result.output


def test_a_malformed_summary_is_a_located_audit_failure(run: Path) -> None:
    """A damaged summary.json in a run directory is tampering or corruption (exit 4), not a usage error."""
    (run / "summary.json").write_text('{\n  "events_head": \n', encoding="utf-8")
    result = esper_report("--verify", run)
    assert result.exit_code == 4, result.output
    assert f"error: {run / 'summary.json'}:3: not valid JSON" in result.stderr
    assert "Traceback" not in result.output


def _interrupted(trainer: Trainer, at: int) -> None:
    """Fit ``trainer`` and stop it as SIGTERM does once step ``at`` is logged (checkpoint, ``interrupted``)."""
    def listen(event: dict) -> None:
        if event.get("event") == "progress" and event["step"] >= at:
            trainer.signals.received = signal.SIGTERM
    with pytest.raises(Interrupted):
        trainer.fit(on_event=listen)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_run(tmp_path_factory.mktemp("checkpointed"), RECIPE + "checkpoint: {every_steps: 60}\n")


def test_an_interrupted_run_verifies_as_unfinished_not_as_tampered(tmp_path: Path) -> None:
    """`esper report` on a run stopped by Ctrl-C said 'AUDIT FAILED' (exit 4): its log has no summary
    to anchor its tail yet, which is what an unfinished run is."""
    (tmp_path / "recipe.yaml").write_text(RECIPE, encoding="utf-8")
    trainer = Trainer.from_recipe(tmp_path / "recipe.yaml", [f"run.output_dir={tmp_path / 'runs'}"])
    _interrupted(trainer, 40)
    result = esper_report("--verify", trainer.run_dir)
    assert result.exit_code == 0, result.output
    assert "the run has not finished, so no summary anchors its last record yet" in result.output
    assert esper_report(trainer.run_dir, "--out", tmp_path / "report").exit_code == 0
    title = (tmp_path / "report" / "report.md").read_text(encoding="utf-8").splitlines()[0]
    assert "unfinished" in title and "audit passed" in title, title
    rewrite(trainer.run_dir, lambda ls: ls[:MIDDLE] + [edited(ls[MIDDLE], reason="forged")] + ls[MIDDLE + 1:])
    assert esper_report("--verify", trainer.run_dir).exit_code == 4


def test_a_finished_run_extended_by_an_interrupted_resume_still_verifies(checkpointed: Path, tmp_path: Path) -> None:
    """The resume cuts the log back to its checkpoint, before the run_end the old summary.json
    anchored: that summary no longer describes the run and goes, and the run verifies as unfinished
    (the stale summary made the audit call the recipe edited, exit 4) until the extension finishes."""
    run = Path(shutil.copytree(checkpointed, tmp_path / "run"))
    _interrupted(Trainer.resume(run, ["trainer.max_steps=200", "telemetry.progress=none"]), 130)
    assert not (run / "summary.json").exists()
    result = esper_report("--verify", run)
    assert result.exit_code == 0, result.output
    assert "the run has not finished" in result.output
    Trainer.resume(run, ["telemetry.progress=none"]).fit()
    assert esper_report("--verify", run).exit_code == 0
    assert json.loads((run / "summary.json").read_text(encoding="utf-8"))["steps"] == 200
