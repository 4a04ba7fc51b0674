"""What a run writes into its run directory besides logs: the directory itself and its lock, the
recipe files and the opening event, and checkpoints with their schedule and retention.

Kept apart from the loop so that ``Trainer.fit`` reads as the training it does; every function here
runs on rank 0 only where the run directory is written (the callers decide with ``trainer.leader``).

A resumed run directory may come from someone else (a tarball, a shared disk): :func:`check_run_files`
refuses one where a link, FIFO or the like stands in place of a file or directory the resume writes,
or where a file the resume writes in place has other names (hard links), before anything is written,
so the resume never writes through it to somewhere outside the run. What is swapped in after that
check is refused when the file is opened, with the same kind of error (exit 3): the logs and the lock
are opened through :func:`esper_core.safe_read.open_run_file`, the logs are checked again before
each checkpoint, and the logs and every file the end of the run replaces before its results are written.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from esper_core.artifacts.publish import publish_checkpoint
from esper_core.checkpoints import store
from esper_core.checkpoints.lock import LOCK_FILE, RunLock
from esper_core.errors import CheckpointError, Problem
from esper_core.export.final import FINAL, MANIFEST, MODEL, TOPOLOGY
from esper_core.growth.state import split
from esper_core.recipe.checks import check_output_dir
from esper_core.recipe.schema import CheckpointConfig
from esper_core.safe_read import foreign, link_count, shared
from esper_core.storage.settings import signing_key
from esper_core.telemetry import tensorboard
from esper_core.telemetry.run import esper_version
from esper_core.training import run_state
from esper_core.training.recording import fresh_run_dir

if TYPE_CHECKING:
    from esper_core.training.trainer import Trainer


class CheckpointSchedule:
    """When the next checkpoint is due: every ``checkpoint.every_steps`` steps and/or every
    ``checkpoint.every_minutes`` since the last one (the clock restarts at each checkpoint, so a slow
    stretch of steps cannot cause a burst of them)."""

    def __init__(self, cfg: CheckpointConfig) -> None:
        self.cfg = cfg
        self.last = time.monotonic()

    def restart(self) -> None:
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.cfg.every_steps and step % self.cfg.every_steps == 0:
            return True
        return bool(self.cfg.every_minutes) and time.monotonic() - self.last >= self.cfg.every_minutes * 60


RUN_DIRECTORIES = (FINAL, tensorboard.DIRECTORY)
"""Directories of a run that a resume writes into, checked before the files inside them (``checkpoints/``
is the checkpoint store's to check: it refuses a link before it reads or writes anything there)."""
RUN_FILES = ("events.jsonl", "metrics.jsonl", "summary.json", LOCK_FILE,
             *(f"{FINAL}/{name}" for name in (MODEL, TOPOLOGY, MANIFEST)))
"""Files of a run that a resume truncates, appends to, replaces or removes."""
IN_PLACE = ("events.jsonl", "metrics.jsonl", LOCK_FILE)
"""The files of :data:`RUN_FILES` written in place (appended to, truncated): one with another name (a hard
link) is written under that name too. The others are replaced by a rename, which only replaces the name."""


def check_run_files(run_dir: Path) -> None:
    """Refuse (exit 3, naming it) a run where anything but a regular file or a real directory stands in
    place of one a resume writes: through a link planted there, the resume would truncate, append to or
    overwrite a file outside the run. So is a file written in place that has other names (a hard link,
    which no open can refuse to follow: it is the same file). The end of a run checks again before it
    writes its results: a directory made where ``summary.json`` belongs fails the rename that writes it."""
    for names, directory in ((RUN_DIRECTORIES, True), (RUN_FILES, False)):
        for name in names:
            kind = foreign(run_dir / name, directory)
            if kind is not None:
                what = "directory" if directory else "file"
                raise CheckpointError(Problem(str(run_dir / name), f"{kind} in place of the run's own {what}: a run "
                                              "writes only inside its directory, never where a link points; restore "
                                              f"the {what} or remove what is there, and resume"))
    for name in IN_PLACE:
        links = link_count(run_dir / name)
        if links > 1:
            raise CheckpointError(Problem(str(run_dir / name), shared(links)))


def claim_run_dir(trainer: Trainer) -> RunLock | None:
    """Name a fresh run directory (rank 0; the other ranks receive its name) unless resuming, and lock
    it on rank 0: one process writes a run, so a second resume of it is refused (exit 3)."""
    recipe = trainer.loaded.recipe
    if trainer._resumed_from is None and trainer.leader:
        check_output_dir(trainer.loaded)
        with trainer.loaded.located():
            trainer.run_dir = fresh_run_dir(Path(recipe.run.output_dir).resolve() / recipe.run.name)
    if trainer.world is not None and trainer._resumed_from is None:
        trainer.run_dir = Path(trainer.world.broadcast_text(str(trainer.run_dir)))  # rank 0 named it
    assert trainer.run_dir is not None
    if not trainer.leader:
        return None
    lock = RunLock(trainer.run_dir)
    lock.acquire()
    return lock


def open_run(trainer: Trainer, resumed_from: store.Checkpoint | None, overrides: list[str]) -> None:
    """Write the recipe files of a new run (or clear a crashed checkpoint's leftovers at resume), open
    the recorder where the logs left off, and record ``run_start`` or ``run_resume``."""
    cursor = None
    run_dir = trainer.run_dir
    assert run_dir is not None
    loaded, recorder = trainer.loaded, trainer.recorder
    if resumed_from is None:
        if trainer.leader:
            (run_dir / "recipe.yaml").write_text(loaded.resolved_yaml, encoding="utf-8")
            (run_dir / "recipe.sha256").write_text(loaded.sha256 + "\n", encoding="utf-8")
    else:
        cursor = resumed_from.state["run"]["logs"]
        recorder.open_logs(run_dir)  # refused (a link swapped in since the check) before anything changes
        if trainer.leader:
            store.remove_leftovers(run_dir / "checkpoints")
            # A finished run being extended is unfinished again: the log is cut back to the checkpoint,
            # before the run_end its summary anchors, so that summary no longer describes the run (the
            # audit would call it tampered with until the extension finishes and writes the next one).
            (run_dir / "summary.json").unlink(missing_ok=True)
    run_id = uuid.uuid4().hex  # this segment of the run in the asset repository
    recorder.open(run_dir, cursor, run_id, loaded.recipe.model_dump(mode="json"))
    recorder.mirror(lambda repo: repo.start_run(run_id, run_dir.name, loaded.sha256))
    identity = recorder.telemetry.identity()
    if trainer.world is not None:
        identity["world_size"] = trainer.world.size
    if resumed_from is None:
        recorder.record({"event": "run_start", "step": 0, "run_id": run_id, "signed": signing_key() is not None,
                         # where the asset repository is when the workspace is relative: `report --verify`
                         # finds the run's copy of the events from any directory
                         "workspace": str(Path(loaded.recipe.storage.workspace).resolve()),
                         "recipe_sha256": loaded.sha256, "device": str(trainer.device),
                         "params": trainer.params_initial, "layers": list(trainer.manager.layers), **identity})
    else:
        recorder.record({"event": "run_resume", "step": trainer.step, "run_id": run_id,
                         "checkpoint": resumed_from.path.name, "overrides": overrides,
                         "recipe_sha256": loaded.sha256, **identity})


def checkpoint_contents(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the JSON state a checkpoint of the run holds now (``benchmarks/checkpoint.py``
    times saving exactly this)."""
    tensors, skeleton = split(run_state.capture(trainer, checkpoint=True))
    return tensors, {"run": skeleton, **trainer.recipe_record.fields()}


def save_checkpoint(trainer: Trainer) -> Path:
    """Commit a checkpoint of the run's state (see :mod:`~esper_core.training.run_state`), apply
    retention, publish it where the recipe's storage says, and restart the checkpoint clock."""
    assert trainer.run_dir is not None
    started = time.perf_counter()
    trainer.recorder.check_logs()  # a log swapped since it was opened: stop with the last checkpoint intact
    trainer.recorder.record({"event": "checkpoint", "step": trainer.step, "name": store.checkpoint_name(trainer.step)})
    tensors, state = checkpoint_contents(trainer)
    val = trainer.last_val
    info = {"recipe_sha256": trainer.loaded.sha256, "device": str(trainer.device), "epoch": trainer.sampler.epoch,
            "world_size": trainer.world.size if trainer.world is not None else 1,
            "esper": esper_version(), "val_loss": val["loss"] if val else None, "host_model": host_model(trainer),
            "data_sha256": trainer.data.fingerprint}
    directory = trainer.run_dir / "checkpoints"
    try:
        path = store.save(directory, trainer.step, tensors, state, info)
    except OSError as error:  # a full disk, a read-only directory: the run stops with what it last committed
        raise CheckpointError(Problem(str(directory), f"cannot write checkpoint {store.checkpoint_name(trainer.step)}: "
                                      f"{error.strerror or error}")) from None
    store.retain(directory, trainer.loaded.recipe.checkpoint.keep, lambda m: m.get("val_loss"))
    publish_checkpoint(trainer.run_dir, path, trainer.loaded.recipe.storage)
    trainer.checkpoints.restart()
    trainer.recorder.telemetry.checkpointed(time.perf_counter() - started)
    return path


def host_model(trainer: Trainer) -> dict[str, Any]:
    """What rebuilding the host model needs besides the recipe (recorded in final/ and checkpoints)."""
    return {"input_shape": list(trainer.data.input_shape), "num_classes": trainer.data.num_classes}
