"""Checkpoint store under crashes and hostile files (issue 11, items 5, 11, 13, 15).

Crashes are injected at every rename and delete of a save or a retention (the exception stands for
a kill -9 at that instant: nothing after it runs); hostile files are what an attacker or a broken
disk leaves: nested JSON, random bytes, FIFOs, links to elsewhere. Each must end with a loadable
checkpoint or one located error (exit 3), never a hang, a traceback or a half-deleted step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from esper_core.checkpoints import store
from esper_core.checkpoints.lock import RunLock
from esper_core.errors import CheckpointError

T = TypeVar("T")


class Killed(BaseException):
    """Stands for SIGKILL at the instrumented call: it is not an Exception, so no cleanup catches it."""


def save(directory: Path, step: int, value: float) -> Path:
    return store.save(directory, step, {"w": torch.full((4, 4), value)}, {"step": step, "value": value},
                      {"recipe_sha256": "0" * 64})


def value_of(checkpoint: store.Checkpoint) -> float:
    return float(checkpoint.tensors["w"][0, 0])


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").write_text("")
    save(run / "checkpoints", 10, 1.0)
    save(run / "checkpoints", 20, 2.0)
    return run


def crash_on_call(monkeypatch: pytest.MonkeyPatch, module: object, name: str, n: int) -> None:
    """Make the ``n``-th call (0-based) of ``module.name`` kill the process instead of returning."""
    original = getattr(module, name)
    calls = []

    def instrumented(*args: object, **kwargs: object) -> object:
        calls.append(args)
        if len(calls) - 1 == n:
            raise Killed(f"killed at {name} #{n}")
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, instrumented)


# --- item 5: saving a step that already has a checkpoint -----------------------------------------

@pytest.mark.parametrize("point", [("rename", 0), ("rename", 1), ("rmtree", 0)])
def test_a_crash_while_replacing_a_checkpoint_always_leaves_that_step_loadable(run_dir, monkeypatch, point):
    name, n = point
    crash_on_call(monkeypatch, store.os if name == "rename" else store.shutil, name, n)
    with pytest.raises(Killed):
        save(run_dir / "checkpoints", 20, 3.0)  # a signal on a checkpoint step: step 20 written again
    monkeypatch.undo()
    found = store.find(run_dir, strict=True, warn=pytest.fail)
    assert found.path.name == store.checkpoint_name(20) and value_of(found) in (2.0, 3.0)
    store.remove_leftovers(run_dir / "checkpoints")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "LATEST", store.checkpoint_name(10), store.checkpoint_name(20)]


def test_replacing_a_checkpoint_keeps_the_new_one(run_dir):
    save(run_dir / "checkpoints", 20, 3.0)
    assert value_of(store.find(run_dir, strict=True, warn=pytest.fail)) == 3.0
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


# --- item 15b: a kill during retention ------------------------------------------------------------

def test_a_kill_during_retention_never_leaves_a_half_deleted_step(run_dir, monkeypatch):
    save(run_dir / "checkpoints", 30, 3.0)
    original = shutil.rmtree

    def delete_one_file_then_die(path: Path, *args: object, **kwargs: object) -> None:
        next(f for f in Path(path).iterdir() if f.name == store.TENSORS).unlink()
        raise Killed("killed mid-delete")
    monkeypatch.setattr(store.shutil, "rmtree", delete_one_file_then_die)
    with pytest.raises(Killed):
        store.retain(run_dir / "checkpoints", keep=1, metric=lambda manifest: None)
    monkeypatch.setattr(store.shutil, "rmtree", original)
    for path in store.committed(run_dir / "checkpoints"):
        store.load(path)  # every step-* directory left is whole
    warnings: list[str] = []
    assert store.find(run_dir, strict=False, warn=warnings.append).path.name == store.checkpoint_name(30)
    assert warnings == []
    removed = store.remove_leftovers(run_dir / "checkpoints")
    assert [p.name.startswith(store.TRASH_PREFIX) for p in removed] == [True]


# --- item 15a: a run killed before its first checkpoint -------------------------------------------

def test_resuming_a_run_without_checkpoints_says_none_was_written_and_how_to_enable_them(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").write_text("")
    (run / "recipe.yaml").write_text("run: {name: x}\n")
    with pytest.raises(CheckpointError) as info:
        store.find(run, strict=False, warn=pytest.fail)
    assert info.value.exit_code == 3
    message = str(info.value)
    assert "no checkpoint was written yet" in message and "checkpoint.every_steps" in message
    assert "checkpoint.every_minutes" in message
    (run / "checkpoints").mkdir()  # killed during the first save: only a temporary directory
    (run / "checkpoints" / ".tmp-step-00000005-1").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint was written yet"):
        store.find(run, strict=False, warn=pytest.fail)
    (run / "summary.json").write_text("{}")  # it finished: checkpoints were off, it did not stop early
    with pytest.raises(CheckpointError, match="the run finished with checkpoints off"):
        store.find(run, strict=False, warn=pytest.fail)


@pytest.mark.parametrize("planted", ["file", "fifo"])
def test_something_in_place_of_the_checkpoints_directory_is_named_not_taken_for_checkpoints_off(tmp_path, planted):
    """A file or a FIFO where a finished run's checkpoints/ belongs was reported as "the run finished with
    checkpoints off", sending the user to train again: it is named, as a link there already was."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").write_text("")
    (run / "summary.json").write_text("{}")
    if planted == "fifo":
        os.mkfifo(run / "checkpoints")
    else:
        (run / "checkpoints").write_text("step-00000010\n")
    with pytest.raises(CheckpointError) as info:
        store.find(run, strict=False, warn=pytest.fail)
    kind = "a FIFO" if planted == "fifo" else "a regular file"
    assert str(info.value).startswith(f"{run / 'checkpoints'}: {kind} in place of the run's own checkpoints directory")
    assert info.value.exit_code == 3


def test_esper_resume_of_a_run_without_checkpoints_exits_3_without_traceback(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").write_text("")
    result = subprocess.run([sys.executable, "-m", "esper_cli", "resume", "--checkpoint", str(run)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert "no checkpoint was written yet" in result.stderr and "Traceback" not in result.stderr


# --- item 11: hostile files -----------------------------------------------------------------------

def nested_manifest(path: Path) -> None:
    (path / store.MANIFEST).write_text("[" * 100_000 + "]" * 100_000)


def fifo_state(path: Path) -> None:
    (path / store.STATE).unlink()
    os.mkfifo(path / store.STATE)


def fifo_manifest(path: Path) -> None:
    (path / store.MANIFEST).unlink()
    os.mkfifo(path / store.MANIFEST)


def device_tensors(path: Path) -> None:
    (path / store.TENSORS).unlink()
    (path / store.TENSORS).symlink_to("/dev/zero")


def tensors_linked_outside(path: Path) -> None:
    """A link to an outside copy with the right bytes: the hash matches, the link is still refused."""
    outside = path.parent.parent.parent / "elsewhere.safetensors"
    shutil.copyfile(path / store.TENSORS, outside)
    (path / store.TENSORS).unlink()
    (path / store.TENSORS).symlink_to(outside)


def directory_linked_outside(path: Path) -> None:
    outside = path.parent.parent.parent / "elsewhere"
    shutil.move(path, outside)
    path.symlink_to(outside, target_is_directory=True)


def huge_announced_size(path: Path) -> None:
    manifest = json.loads((path / store.MANIFEST).read_text())
    manifest["files"][store.STATE]["bytes"] = 10**15
    (path / store.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, culprit", [
    (nested_manifest, store.MANIFEST), (fifo_state, store.STATE), (fifo_manifest, store.MANIFEST),
    (device_tensors, store.TENSORS), (tensors_linked_outside, store.TENSORS), (directory_linked_outside, ""),
    (huge_announced_size, store.MANIFEST)])
def test_a_hostile_newest_checkpoint_is_skipped_with_a_warning_naming_the_file(run_dir, damage, culprit):
    newest = run_dir / "checkpoints" / store.checkpoint_name(20)
    damage(newest)
    warnings: list[str] = []
    found = run_with_timeout(lambda: store.find(run_dir, strict=False, warn=warnings.append))
    assert found.path.name == store.checkpoint_name(10) and value_of(found) == 1.0
    assert len(warnings) == 1 and str(newest / culprit).rstrip("/") in warnings[0], warnings
    with pytest.raises(CheckpointError) as info:
        run_with_timeout(lambda: store.find(run_dir, strict=True, warn=warnings.append))
    assert info.value.exit_code == 3 and str(newest / culprit).rstrip("/") in str(info.value)


def test_when_every_checkpoint_is_hostile_the_error_names_each(run_dir):
    for step in (10, 20):
        fifo_state(run_dir / "checkpoints" / store.checkpoint_name(step))
    with pytest.raises(CheckpointError) as info:
        run_with_timeout(lambda: store.find(run_dir, strict=False, warn=lambda message: None))
    assert [p.source for p in info.value.problems] == [
        str(run_dir / "checkpoints" / store.checkpoint_name(s) / store.STATE) for s in (20, 10)]


def test_naming_a_checkpoint_that_is_gone_lists_the_ones_there_are(run_dir):
    """`esper resume --checkpoint RUN/checkpoints/step-N` for a step retention pruned: one error that
    says which checkpoints the run has (it was a warning that it skipped the step, then the same
    problem again as the error)."""
    warnings: list[str] = []
    with pytest.raises(CheckpointError) as info:
        store.find(run_dir / "checkpoints" / store.checkpoint_name(5), strict=False, warn=warnings.append)
    assert not warnings and info.value.exit_code == 3
    assert f"no such checkpoint (the run has: {store.checkpoint_name(10)}, {store.checkpoint_name(20)})" in str(info.value)


@pytest.mark.parametrize("content", [os.urandom(64) + b"\xff\xfe", b"step-00000099\n", b"../../etc\n"],
                         ids=["random bytes", "names a regular file", "names a path outside"])
def test_a_damaged_latest_pointer_falls_back_to_the_newest_checkpoint(run_dir, content):
    directory = run_dir / "checkpoints"
    (directory / store.LATEST).write_bytes(content)
    (directory / store.checkpoint_name(99)).write_text("a regular file where a checkpoint should be")
    warnings: list[str] = []
    found = store.find(run_dir, strict=False, warn=warnings.append)
    assert found.path.name == store.checkpoint_name(20)
    assert len(warnings) == 1 and str(directory) in warnings[0], warnings
    with pytest.raises(CheckpointError):
        store.find(run_dir, strict=True, warn=warnings.append)


def test_latest_naming_a_checkpoint_whose_rename_was_lost_falls_back(run_dir):
    """The crash window of a save (one directory fsync covers both renames): ``LATEST`` became
    durable, the rename of its directory did not, and the temporary directory is still there."""
    directory = run_dir / "checkpoints"
    (directory / f"{store.TEMP_PREFIX}{store.checkpoint_name(30)}-4242").mkdir()
    (directory / store.LATEST).write_text(store.checkpoint_name(30) + "\n")
    warnings: list[str] = []
    found = store.find(run_dir, strict=False, warn=warnings.append)
    assert found.path.name == store.checkpoint_name(20)
    assert len(warnings) == 1 and store.checkpoint_name(30) in warnings[0], warnings


def test_latest_naming_a_fifo_does_not_hang(run_dir):
    directory = run_dir / "checkpoints"
    os.mkfifo(directory / store.checkpoint_name(99))
    (directory / store.LATEST).write_text(store.checkpoint_name(99) + "\n")
    warnings: list[str] = []
    found = run_with_timeout(lambda: store.find(run_dir, strict=False, warn=warnings.append))
    assert found.path.name == store.checkpoint_name(20)
    assert str(directory / store.checkpoint_name(99)) in warnings[0]


def test_esper_resume_strict_on_a_nested_manifest_exits_3_naming_it(run_dir):
    nested_manifest(run_dir / "checkpoints" / store.checkpoint_name(20))
    result = subprocess.run([sys.executable, "-m", "esper_cli", "resume", "--checkpoint", str(run_dir), "--strict"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert "nested more than" in result.stderr and store.MANIFEST in result.stderr
    assert "Traceback" not in result.stderr


TINY_RUN = """\
run: {{name: tiny, seed: 0, device: cpu}}
data: {{source: digits, layout: flat, batch_size: 32}}
model: {{arch: mlp, widths: [16]}}
policy: {{max_seeds: 0}}
trainer: {{max_steps: 4, eval_every: 2}}
checkpoint: {{every_steps: 2}}
telemetry: {{progress: none}}
storage: {{workspace: "{workspace}"}}
"""


def test_a_fifo_in_place_of_a_runs_recipe_is_named_and_nothing_waits_for_it(tmp_path):
    """A resume hashes and reads the run's ``recipe.yaml``; a FIFO there was "missing or does not match the
    recipe hash" (wrong: something is there, and it is not a file), and ``esper resume --nproc-per-node``,
    which reads it for the rendezvous id before it launches, blocked forever. Now the resume names what
    stands there (exit 3), and the launcher leaves the id to torchrun's default."""
    from esper_cli.launching import resumed_rendezvous_id
    from esper_core.training.trainer import Trainer

    (tmp_path / "recipe.yaml").write_text(TINY_RUN.format(workspace=tmp_path / "ws"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer.from_recipe(tmp_path / "recipe.yaml", [f"run.output_dir={tmp_path / 'runs'}"])
        run = Path(trainer.fit()["run_dir"])
    finally:
        torch.set_num_threads(before)
    (run / "recipe.yaml").unlink()
    os.mkfifo(run / "recipe.yaml")
    assert run_with_timeout(lambda: resumed_rendezvous_id(str(run))) is None
    result = subprocess.run([sys.executable, "-m", "esper_cli", "resume", "--checkpoint", str(run),
                             "trainer.max_steps=6"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines() == [f"error: {run / 'recipe.yaml'}: is not a regular file (it is a FIFO)"], \
        result.stderr
    # export and sync read the same file first: they named the run "not a run directory (no recipe.yaml)"
    for command in (["export", str(run), "--format", "safetensors"], ["sync", str(run), "--to", "s3://bucket/runs"]):
        result = subprocess.run([sys.executable, "-m", "esper_cli", *command], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 3, (command, result.stderr)
        assert result.stderr.splitlines() == [f"error: {run / 'recipe.yaml'}: is not a regular file (it is a FIFO)"], \
            (command, result.stderr)


def run_with_timeout(call: Callable[[], T], seconds: float = 20.0) -> T:
    """Run ``call`` on a daemon thread: a hang (a FIFO opened for reading) fails the test, not the suite."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # re-raised in the test's thread
            outcome["error"] = exc
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "hung"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


# --- item 13: one process per run -----------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from esper_core.checkpoints.lock import RunLock
with RunLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_process_cannot_take_a_held_run_and_is_told_who_holds_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError) as info:
            with RunLock(tmp_path):
                pytest.fail("took a lock another process holds")
        assert info.value.exit_code == 3 and f"run is in use by pid {holder.pid}" in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # a killed holder's lock is gone with it
        pass


def test_when_every_checkpoint_is_hostile_each_is_said_once(run_dir):
    """Skipped checkpoints are warned about only when an older one is used; when none is, the error
    alone names each (it said every problem twice: as warnings, then as the error)."""
    for step in (10, 20):
        fifo_state(run_dir / "checkpoints" / store.checkpoint_name(step))
    warnings: list[str] = []
    with pytest.raises(CheckpointError) as info:
        run_with_timeout(lambda: store.find(run_dir, strict=False, warn=warnings.append))
    assert warnings == [] and len(info.value.problems) == 2


def test_damage_where_the_next_save_writes_gives_way_to_the_new_checkpoint(run_dir):
    """A file where the next checkpoint's directory goes and a directory where LATEST goes (a broken
    disk, a stray copy): the save replaces both instead of failing with a traceback."""
    directory = run_dir / "checkpoints"
    (directory / store.checkpoint_name(30)).write_text("not a checkpoint")
    (directory / store.LATEST).unlink()
    (directory / store.LATEST).mkdir()
    save(directory, 30, 3.0)
    found = store.find(run_dir, strict=True, warn=lambda message: None)
    assert found.path.name == store.checkpoint_name(30) and value_of(found) == 3.0
