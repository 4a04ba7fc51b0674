"""A run directory may come from someone else, and a resume writes into it. Two ways that went wrong:

- a **hard link** (``events.jsonl``, ``metrics.jsonl`` or ``.lock`` given a second name, e.g. the
  user's ``~/.bashrc``, with ``ln`` or ``cp -al``) was written in place, silently: the resume cut the
  other file back to the checkpoint's log size and appended its events to it. No open can refuse to
  follow a hard link (it is the same file), so a file written in place that has other names is refused;
- a **link swapped in while the resume was already running** (after its up-front check of the run
  files) ended in a traceback from deep in the trainer, or, swapped in while it trained, went unnoticed
  and the next checkpoint counted a log that was no longer the run's.

Each is the one-line error, exit 3, naming the file, with nothing outside the run written and the last
good checkpoint intact. The attacker is played by the run's own recipe code (a data factory that runs
while the resume loads, a custom loss that runs while it trains), so every run here is a real
``esper resume`` in a subprocess, on real files, with the swap at a known point.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from esper_core import safe_read
from esper_core.checkpoints import store
from esper_core.errors import CheckpointError
from esper_core.telemetry.jsonl import EventLog
from esper_core.training.trainer import Trainer

HOOKS = "esper_plant_hooks"
HOOKS_SOURCE = '''
"""Plays someone swapping a run file while a resume runs: ``PLANT`` names the run file, ``PLANT_HOW``
is ``symlink`` or ``hard`` (a link to ``PLANT_VICTIM``), ``PLANT_WHEN`` is ``load`` (while the
resume builds its data, after it checked the run files) or ``train`` (once ``PLANT_AFTER``, a
checkpoint directory, exists)."""
import os
from pathlib import Path

import torch
from torch.utils.data import TensorDataset


def _plant(when):
    if os.environ.get("PLANT_WHEN") != when or os.environ.get("PLANTED"):
        return
    if when == "train" and not Path(os.environ["PLANT_AFTER"]).is_dir():
        return
    os.environ["PLANTED"] = "1"
    target, victim = Path(os.environ["PLANT"]), os.environ["PLANT_VICTIM"]
    target.unlink(missing_ok=True)
    if os.environ["PLANT_HOW"] == "hard":
        os.link(victim, target)
    else:
        target.symlink_to(victim)


def data():
    _plant("load")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return TensorDataset(x[:200], y[:200]), TensorDataset(x[200:250], y[200:250]), TensorDataset(x[250:], y[250:])


def loss(output, targets):
    _plant("train")
    return (output.mean(-1) - targets.float()).pow(2).mean()  # a custom task's model has one output
'''

RECIPE = f"""\
run: {{name: planted, seed: 0, device: cpu}}
task: {{kind: custom, function: "{HOOKS}:loss"}}
data: {{source: factory, factory: "{HOOKS}:data", batch_size: 32}}
model: {{arch: mlp, widths: [16]}}
policy: {{max_seeds: 0}}
trainer: {{max_steps: 40, eval_every: 10, log_every: 10}}
checkpoint: {{every_steps: 20, keep: 10}}
telemetry: {{progress: none}}
"""
USER_TEXT = "export PATH=$HOME/bin:$PATH  # the user's own file, which no resume may touch\n" * 40


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The directory of the recipe and its hooks module, on ``sys.path`` here and in each subprocess."""
    root = tmp_path_factory.mktemp("planted")
    (root / f"{HOOKS}.py").write_text(HOOKS_SOURCE)
    (root / "recipe.yaml").write_text(RECIPE)
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(HOOKS, None)


@pytest.fixture(scope="module")
def finished(hooks: Path) -> Path:
    """A finished run of 40 steps with checkpoints at 20 and 40 (a resume extends it)."""
    summary = Trainer.from_recipe(hooks / "recipe.yaml", [f"run.output_dir={hooks / 'runs'}",
                                                          f"storage.workspace={hooks / 'ws'}"]).fit()
    return Path(summary["run_dir"])


def _copy(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run, symlinks=True)
    return run


def _contents(run: Path) -> dict[str, bytes]:
    """Every regular file of the run by name (links are not followed): what "nothing lost" compares."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def resume(run: Path, hooks: Path, *overrides: str, **plant: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANT")}
    env |= {"PYTHONPATH": os.pathsep.join([str(hooks), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "ESPER_ALLOW_FACTORIES": "1", **plant}
    env.pop("ESPER_SIGNING_KEY", None)
    return subprocess.run([sys.executable, "-m", "esper_cli", "resume", "--checkpoint", str(run), *overrides],
                          capture_output=True, text=True, timeout=300, env=env)


def test_a_file_opened_for_writing_with_another_name_is_refused_on_its_descriptor(tmp_path: Path) -> None:
    """The check is on the opened descriptor (no window between check and write) and only for writing:
    reading a file that has other names is harmless and stays allowed."""
    user = tmp_path / "bashrc"
    user.write_text(USER_TEXT)
    log = tmp_path / "events.jsonl"
    os.link(user, log)
    assert safe_read.read_regular(log, 1 << 20) == USER_TEXT.encode()
    with pytest.raises(CheckpointError) as refused:
        safe_read.open_run_file(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    (problem,) = refused.value.problems
    assert problem.source == str(log) and "2 hard links" in problem.message and "cp -al" in problem.message
    with pytest.raises(ValueError, match="O_TRUNC"):  # it would cut the file before the check
        safe_read.open_regular(log, os.O_WRONLY | os.O_TRUNC)
    assert user.read_text() == USER_TEXT
    os.unlink(user)  # the run's file alone again: written as before
    os.close(safe_read.open_run_file(log, os.O_WRONLY | os.O_APPEND))


def test_a_finished_log_still_says_where_it_ends(tmp_path: Path) -> None:
    """The checkpoint cursor reads a log's size from the file the writer holds; a run that has finished
    (its logs closed) is still checkpointed by ``benchmarks/checkpoint.py`` and by a user who saves after
    ``fit()``, so a closed log answers with the size it had when it closed."""
    log = EventLog(tmp_path / "events.jsonl")
    log.append({"event": "run_start"})
    log.close()
    assert log.size == (tmp_path / "events.jsonl").stat().st_size > 0


@pytest.mark.parametrize("name", ["events.jsonl", "metrics.jsonl", ".lock"])
def test_a_resume_never_writes_a_run_file_that_has_another_name(finished: Path, hooks: Path, tmp_path: Path,
                                                                name: str) -> None:
    """`cp -al`, or `ln ~/.bashrc run/events.jsonl`: the resume cut the user's file back to the checkpoint's
    log size and appended the run's events to it (the metrics and the lock the same way). Refused before
    anything is written (exit 3, naming the file); the other name's file and the run are unchanged."""
    run = _copy(finished, tmp_path)
    user = tmp_path / "bashrc"
    user.write_text(USER_TEXT)
    (run / name).unlink()
    os.link(user, run / name)
    before = _contents(run)
    result = resume(run, hooks, "trainer.max_steps=60")
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert f"error: {run / name}: a file with 2 hard links" in result.stderr, result.stderr
    assert user.read_text() == USER_TEXT and _contents(run) == before


def test_a_checkpoint_file_with_another_name_is_read_and_never_written(finished: Path, hooks: Path,
                                                                       tmp_path: Path) -> None:
    """Checkpoint files are only read at a resume and written fresh (a temporary directory renamed into
    place), so one that shares its file with another name resumes, and that other file is unchanged."""
    run = _copy(finished, tmp_path)
    tensors = run / "checkpoints" / store.checkpoint_name(40) / store.TENSORS
    other = tmp_path / "backup.safetensors"
    os.link(tensors, other)
    before = other.read_bytes()
    result = resume(run, hooks, "trainer.max_steps=60")
    assert result.returncode == 0, result.stderr
    assert other.read_bytes() == before and (run / "checkpoints" / store.checkpoint_name(60)).is_dir()


@pytest.mark.parametrize("name, how", [("events.jsonl", "symlink"), ("metrics.jsonl", "hard"), (".lock", "symlink"),
                                       (".lock", "hard")])
def test_a_link_swapped_in_while_a_resume_loads_is_the_same_clear_error(finished: Path, hooks: Path, tmp_path: Path,
                                                                        name: str, how: str) -> None:
    """Swapped in after the resume checked the run files and before it opened them (here: while it built
    its data), a symbolic link was a traceback (``UnsafeInput`` from the log's open, ``OSError`` from the
    lock's) and a hard link was written through. Now: exit 3 naming the file, the user's file unchanged,
    and nothing of the run lost (the finished run's summary.json is still there, no log was cut)."""
    run = _copy(finished, tmp_path)
    user = tmp_path / "bashrc"
    user.write_text(USER_TEXT)
    before = _contents(run)
    result = resume(run, hooks, "trainer.max_steps=60", PLANT=str(run / name), PLANT_HOW=how,
                    PLANT_VICTIM=str(user), PLANT_WHEN="load")
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    said = "a file with 2 hard links" if how == "hard" else "cannot be written (a symbolic link)"
    assert f"error: {run / name}: " in result.stderr and said in result.stderr, result.stderr
    assert user.read_text() == USER_TEXT
    changed = {name, ".lock"}  # the planted file, and the lock that holds the holder's pid
    after = _contents(run)
    assert {k: v for k, v in after.items() if k not in changed} == {k: v for k, v in before.items() if k not in changed}


@pytest.mark.parametrize("name", ["events.jsonl", "metrics.jsonl"])
def test_a_log_swapped_while_a_resume_trains_stops_it_with_the_last_checkpoint_intact(
        finished: Path, hooks: Path, tmp_path: Path, name: str) -> None:
    """Swapped for a link after the resume opened it, a log's writes go on into the file the run holds
    (no longer in the run), and the next checkpoint recorded, as the log's size, the size of whatever
    the link named: the run finished "successfully" with a log that was not its own. Now the run stops
    at that checkpoint with the one-line error, exit 3, before writing it: the last good checkpoint is
    LATEST and loads, and the user's file is unchanged."""
    run = _copy(finished, tmp_path)
    user = tmp_path / "bashrc"
    user.write_text(USER_TEXT)
    checkpoints = run / "checkpoints"
    after = str(checkpoints / store.checkpoint_name(60))
    result = resume(run, hooks, "trainer.max_steps=80", PLANT=str(run / name), PLANT_HOW="symlink",
                    PLANT_VICTIM=str(user), PLANT_WHEN="train", PLANT_AFTER=after)
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert f"error: {run / name}: replaced while the run was writing it (now a symbolic link" in result.stderr
    assert user.read_text() == USER_TEXT
    assert not (checkpoints / store.checkpoint_name(80)).exists() and not (run / "summary.json").exists()
    assert (checkpoints / store.LATEST).read_text().strip() == store.checkpoint_name(60)
    assert store.load(checkpoints / store.checkpoint_name(60)).state["run"]["controller"]["topology"]["step"] == 60
