"""`esper report --verify` beyond the chain (issue 11, items 7 and 8): results bound in `run_end`,
the signed head, the recipe across a resume with overrides, and the asset repository's copy.

One real run is trained per module with its asset repository in a private workspace (SQLite), so
the mirror holds its events. ``finish_per_contract`` gives its ``run_end`` what the trainer is to
record (artifact digests and summary figures, see ``esper_core.telemetry.binding``); tests then edit
the files the way a forger would, consistently rewriting the chain where that is the attack.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from esper_core.telemetry.audit import recipe_problem
from esper_core.telemetry.binding import ARTIFACTS, artifact_digests, sign_head, summary_figures
from run_helpers import MIRRORED_RECIPE as RECIPE
from run_helpers import esper_report, finish_per_contract, finished_run, rechain, records_of

KEY = b"a signing key of some length"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bound")
    return finished_run(root, RECIPE.format(workspace=root / "workspace"))


NO_REPOSITORY = "sqlite:////nonexistent/esper.db"


@pytest.fixture
def mirrored(finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the run as trained: its events are in the workspace's repository."""
    monkeypatch.delenv("ESPER_SIGNING_KEY", raising=False)
    monkeypatch.delenv("ESPER_DATABASE_URL", raising=False)
    return Path(shutil.copytree(finished, tmp_path / "run"))


@pytest.fixture
def run(mirrored: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The copy following the run_end contract. Its rewritten run_end line is not the one the trainer
    mirrored, so these tests verify without the repository (its own tests use ``mirrored``)."""
    finish_per_contract(mirrored)
    monkeypatch.setenv("ESPER_DATABASE_URL", NO_REPOSITORY)
    return mirrored


def verify(run: Path):
    result = esper_report("--verify", run)
    assert "Traceback" not in result.output
    return result


def test_a_run_following_the_contract_verifies(run: Path) -> None:
    result = verify(run)
    assert result.exit_code == 0, result.output
    end = records_of(run)[-1]
    assert set(end["artifacts"]) == set(ARTIFACTS) and end["summary"]["steps"] == 60
    assert "events_head" not in end["summary"] and "run_dir" not in end["summary"]


def test_an_edited_accuracy_in_summary_json_is_named(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    summary["val_accuracy"] = 0.999
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    result = verify(run)
    assert result.exit_code == 4, result.output
    assert f"error: {run / 'summary.json'}: val_accuracy: 0.999 does not match" in result.stderr
    assert "run_end event" in result.stderr


def test_a_key_added_to_summary_json_is_named(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text()) | {"certified": True}
    (run / "summary.json").write_text(json.dumps(summary))
    result = verify(run)
    assert result.exit_code == 4 and "certified: not recorded in the run_end event" in result.stderr


@pytest.mark.parametrize("name", ARTIFACTS)
def test_an_edited_artifact_is_named(run: Path, name: str) -> None:
    path = run / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))
    result = verify(run)
    assert result.exit_code == 4, result.output
    assert f"error: {path}: sha256 " in result.stderr and "does not match the one bound in the run_end" in result.stderr


@pytest.mark.parametrize("name", ["final/model.safetensors", "final/topology.json", "metrics.jsonl"])
def test_a_deleted_or_replaced_artifact_is_named(run: Path, name: str) -> None:
    path = run / name
    path.unlink()
    assert verify(run).exit_code == 4 and f"error: {path}: missing" in verify(run).stderr
    path.symlink_to("/dev/zero")
    result = verify(run)
    assert result.exit_code == 4 and f"error: {path}: cannot be read (a symbolic link)" in result.stderr


def test_artifact_digests_are_the_files_sha256(run: Path) -> None:
    digests = artifact_digests(run)
    assert digests == {name: hashlib.sha256((run / name).read_bytes()).hexdigest() for name in ARTIFACTS}
    summary = json.loads((run / "summary.json").read_text())
    assert summary_figures(summary) == {k: v for k, v in summary.items()
                                        if k not in ("run_dir", "events_head", "events_head_signature")}


# --- the signed head ------------------------------------------------------------------------------

def test_a_signed_run_verifies_with_the_key_and_a_consistent_rewrite_does_not(run: Path, monkeypatch) -> None:
    finish_per_contract(run, KEY)
    monkeypatch.setenv("ESPER_SIGNING_KEY", KEY.decode())
    result = verify(run)
    assert result.exit_code == 0, result.output
    assert "signature verified" in result.stdout
    records = records_of(run)
    records[3]["reason"] = "forged"
    rechain(run, records, key=b"the forger's own key, not ours")
    result = verify(run)
    assert result.exit_code == 4, result.output
    assert "events_head_signature does not match ESPER_SIGNING_KEY" in result.stderr


def test_with_a_key_configured_an_unsigned_run_fails(run: Path, monkeypatch) -> None:
    monkeypatch.setenv("ESPER_SIGNING_KEY", KEY.decode())
    result = verify(run)
    assert result.exit_code == 4 and "no events_head_signature, but ESPER_SIGNING_KEY is set" in result.stderr


def test_a_signed_run_verified_without_the_key_says_the_signature_was_not_checked(run: Path) -> None:
    finish_per_contract(run, KEY)
    result = verify(run)
    assert result.exit_code == 0, result.output
    assert "signed (events_head_signature) but ESPER_SIGNING_KEY is not set: the signature could not be checked" \
        in result.stdout


def test_sign_head_is_keyed_and_off_without_a_key(monkeypatch) -> None:
    monkeypatch.delenv("ESPER_SIGNING_KEY", raising=False)
    assert sign_head("a" * 64) is None
    assert sign_head("a" * 64, KEY) != sign_head("a" * 64, KEY + b"!") and len(sign_head("a" * 64, KEY)) == 64
    monkeypatch.setenv("ESPER_SIGNING_KEY", KEY.decode())
    assert sign_head("a" * 64) == sign_head("a" * 64, KEY)


# --- the asset repository's copy ------------------------------------------------------------------

def test_the_repository_copy_is_consulted_and_matches(mirrored: Path) -> None:
    result = verify(mirrored)
    assert result.exit_code == 0, result.output
    assert "records match the asset repository's copy" in result.stdout


def test_a_consistently_rewritten_chain_is_caught_by_the_repository_copy(mirrored: Path) -> None:
    run = mirrored
    records = records_of(run)
    records[4]["reason"] = "forged"
    rechain(run, records)
    finish_per_contract(run)  # the forger re-binds the results too: only the mirror remains
    result = verify(run)
    assert result.exit_code == 4, result.output
    assert f"error: {run / 'events.jsonl'}:5: record seq 4: differs from the asset repository's copy" in result.stderr


def test_records_deleted_from_the_end_and_rechained_are_caught_by_the_repository_copy(mirrored: Path) -> None:
    run = mirrored
    records = records_of(run)
    rechain(run, records[:-3] + records[-1:])
    finish_per_contract(run)
    result = verify(run)
    assert result.exit_code == 4, result.output
    assert "in the asset repository's copy" in result.stderr and "but not in the log: it was deleted" in result.stderr


def test_the_run_s_own_repository_is_checked_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    """With a relative storage.workspace, verify looked for the repository under the directory it was
    run from: elsewhere it found none, checked nothing and passed a consistently rewritten log."""
    monkeypatch.delenv("ESPER_SIGNING_KEY", raising=False)
    monkeypatch.delenv("ESPER_DATABASE_URL", raising=False)
    trained_in = tmp_path / "project"
    trained_in.mkdir()
    monkeypatch.chdir(trained_in)
    run = finished_run(trained_in, RECIPE.format(workspace="ws").replace("max_steps: 60", "max_steps: 20"))
    monkeypatch.chdir(tmp_path)
    records = records_of(run)
    records[2]["reason"] = "forged"
    rechain(run, records)
    finish_per_contract(run)
    result = verify(run)
    assert result.exit_code == 4 and "record seq 2: differs from the asset repository's copy" in result.stderr, \
        result.output


def test_an_unreachable_repository_is_said_not_checked(mirrored: Path, monkeypatch) -> None:
    monkeypatch.setenv("ESPER_DATABASE_URL", "postgresql://esper@127.0.0.1:1/none")
    result = verify(mirrored)
    assert result.exit_code == 0, result.output
    assert "note: asset repository not checked" in result.stdout


def test_the_postgresql_copy_is_checked(tmp_path: Path, postgres_url: str, monkeypatch) -> None:
    monkeypatch.setenv("ESPER_DATABASE_URL", postgres_url)
    run = finished_run(tmp_path, RECIPE.format(workspace=tmp_path / "workspace").replace("max_steps: 60",
                                                                                        "max_steps: 20"))
    assert verify(run).exit_code == 0
    records = records_of(run)
    records[1]["step"] = 1
    rechain(run, records)
    result = verify(run)
    assert result.exit_code == 4 and "record seq 1: differs from the asset repository's copy" in result.stderr


# --- the recipe across resumes (item 7) -----------------------------------------------------------

def test_summary_may_hold_the_hash_of_the_recipe_with_resume_overrides(run: Path) -> None:
    """``run_resume`` records the hash of the recipe with its overrides; summary.json holds it."""
    records = [r for r in records_of(run)]
    resumed_hash = "ab" * 32
    resume = {"event": "run_resume", "step": 30, "run_id": "r2", "checkpoint": "step-00000030",
              "overrides": ["trainer.max_steps=60"], "recipe_sha256": resumed_hash}
    summary = json.loads((run / "summary.json").read_text()) | {"recipe_sha256": resumed_hash}
    (run / "summary.json").write_text(json.dumps(summary))
    assert recipe_problem(run, records[:3] + [resume] + records[3:]) is None
    assert "summary.json" in str(recipe_problem(run, records))  # without the resume: the hash is not this run's
    original = {**resume, "recipe_sha256": records[0]["recipe_sha256"]}
    assert "summary.json" in str(recipe_problem(run, records[:3] + [original] + records[3:]))


def test_a_resume_with_an_allowed_override_verifies(tmp_path: Path, monkeypatch) -> None:
    """Issue 11 item 7 end to end: `esper resume RUN trainer.max_steps=N` must leave a run that
    verifies (the trainer records the resume's overrides and recipe hash in `run_resume`)."""
    from esper_core.training.trainer import Trainer

    monkeypatch.delenv("ESPER_SIGNING_KEY", raising=False)
    monkeypatch.delenv("ESPER_DATABASE_URL", raising=False)
    text = RECIPE.format(workspace=tmp_path / "workspace").replace("telemetry:", "checkpoint: {every_steps: 20}\n"
                                                                   "telemetry:")
    run = finished_run(tmp_path, text)
    Trainer.resume(run, ["trainer.max_steps=80"]).fit()
    resume = next(r for r in records_of(run) if r["event"] == "run_resume")
    assert resume["overrides"] == ["trainer.max_steps=80"] and resume["recipe_sha256"] != records_of(run)[0][
        "recipe_sha256"]
    result = verify(run)
    assert result.exit_code == 0, result.output
