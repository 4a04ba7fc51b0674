"""Checkpoint directories on disk: atomic commit, verification before parsing, retention.

A checkpoint is ``<run>/checkpoints/step-NNNNNNNN/`` holding ``tensors.safetensors`` (model,
optimizer and RNG tensors), ``state.json`` (everything else) and ``manifest.json`` (sha256 and size
of every other file, versions, step, recipe hash). It is written into a temporary sibling
directory, every file and the directory are fsynced, the directory is renamed into place, the
parent is fsynced, and only then is ``LATEST`` replaced. A reader therefore sees either a whole
checkpoint or none, and a checkpoint whose bytes changed after the commit fails its hashes before
a single byte of it is parsed. Nothing here ever unpickles.

Nothing is deleted in place either. Saving a step that already has a checkpoint (a signal on a
checkpoint step) moves the old directory aside to ``.old-step-N-PID``, renames the new one in, and
only then deletes the old one; a crash between the two renames leaves the old one to be moved back
(:func:`recover`). Retention renames a doomed checkpoint to ``.trash-step-N-PID`` before deleting
it, so a kill mid-delete never leaves a half-deleted ``step-*`` directory.

Reading is defensive: files must be regular files (not links, FIFOs or devices), of bounded size,
with JSON of bounded nesting; a checkpoint that fails any of this is skipped with a warning naming
the file, like one whose hashes do not match. A ``checkpoints`` directory that is itself a link is
refused before anything in it is read or written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import load as load_safetensors

from esper_core.checkpoints.tensor_file import write_tensors
from esper_core.durable import fsync_dir
from esper_core.errors import CheckpointError, Problem
from esper_core.safe_read import UnsafeInput, foreign, parse_json, read_regular

TENSORS = "tensors.safetensors"
STATE = "state.json"
MANIFEST = "manifest.json"
LATEST = "LATEST"
FORMAT = 1
MAX_MANIFEST_BYTES = 1 << 20
MAX_FILE_BYTES = 1 << 40
"""Largest checkpoint file a manifest may announce (1 TiB); reads stop at the announced size."""
TEMP_PREFIX, OLD_PREFIX, TRASH_PREFIX = ".tmp-", ".old-", ".trash-"
_NAME = re.compile(r"^step-(\d{8})$")
NO_CHECKPOINT_YET = ("no checkpoint was written yet: the run stopped before its first checkpoint, so there is "
                     "nothing to resume; start it again with `esper train`, and enable checkpoints with "
                     "checkpoint.every_steps=N or checkpoint.every_minutes=M")
FINISHED_WITHOUT_CHECKPOINTS = ("no checkpoint was written: the run finished with checkpoints off (they are, unless "
                                "checkpoint.every_steps=N or checkpoint.every_minutes=M is set), so it cannot be "
                                "continued; train it again with checkpoints on to extend it later")


def _no_checkpoint(run_dir: Path) -> str:
    """Why a run has nothing to resume: it finished with checkpoints off, or stopped before its first."""
    return FINISHED_WITHOUT_CHECKPOINTS if (run_dir / "summary.json").is_file() else NO_CHECKPOINT_YET


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint's contents."""

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def save(directory: Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any],
         info: dict[str, Any]) -> Path:
    """Atomically commit one checkpoint under ``directory`` and point ``LATEST`` at it.

    The durability steps, each needed for a reader to see a whole checkpoint or none after a crash:

    1. the data of ``tensors.safetensors``, ``state.json`` and ``manifest.json``, and the temporary
       directory's entries for them, are made durable before the directory is renamed into place
       (otherwise the renamed directory could hold empty or missing files); the new ``LATEST``,
       written to a temporary file, likewise before it replaces the old one;
    2. the directory is renamed into place and ``LATEST`` replaced, and then one fsync of the parent
       directory makes both entries durable before this returns.

    Every file of step 1 is written before any fsync starts, and then the five fsyncs (four files
    and the temporary directory) are issued together from worker threads: they are independent of
    one another, and the file system commits them in one journal transaction where it can (on ext4
    here, three files and a directory synced together took the time of one). So no file's bytes
    depend on another's sync: the tensors' sha256, which the manifest needs, is computed while the
    tensors are written (:mod:`esper_core.checkpoints.tensor_file`), not read back afterwards.

    Step 2 used to fsync the parent twice, once after each rename, so that ``LATEST`` could never
    become durable before the directory it names. One fsync saves a third of a small checkpoint's
    fixed cost, and the order is kept where it matters: a journaling file system (ext4, XFS) commits
    the two renames of one directory in order, and on one that did not, a crash in the window would
    leave ``LATEST`` naming a missing ``step-N``, which :func:`find` skips (with a warning) for the
    newest committed checkpoint, as it skips any checkpoint that fails verification.

    ``tensors`` must be CPU tensors (:func:`esper_core.growth.state.split` makes them)."""
    _own(directory).mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = directory / name
    temp = directory / f"{TEMP_PREFIX}{name}-{os.getpid()}"
    _remove(temp)
    temp.mkdir()
    state_bytes = json.dumps(state, sort_keys=True).encode("utf-8")
    pool, latest = _workers(), None
    handles: list[BinaryIO] = []
    syncs: list[Future[None]] = []
    try:
        handles.append(open(temp / TENSORS, "wb"))
        files = {TENSORS: write_tensors(handles[-1], tensors), STATE: _digest(state_bytes)}
        handles.append(_filled(open(temp / STATE, "wb"), state_bytes))
        manifest = {"format": FORMAT, "step": step, "files": files, "python": sys.version.split()[0],
                    "torch": torch.__version__, **info}
        text = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
        handles.append(_filled(open(temp / MANIFEST, "wb"), text))
        descriptor, path = tempfile.mkstemp(prefix=f".{LATEST}-", suffix=".tmp", dir=directory)
        latest = Path(path)
        handles.append(_filled(os.fdopen(descriptor, "wb"), (name + "\n").encode()))
        syncs = [pool.submit(_sync_and_close, handle) for handle in handles]
        handles = []
        syncs.append(pool.submit(fsync_dir, temp))
        for sync in syncs:
            sync.result()  # an fsync that failed fails the save before anything is renamed
        old = None
        if final.exists() or final.is_symlink():  # this step's name is taken: replace it, never leaving neither
            old = directory / f"{OLD_PREFIX}{name}-{os.getpid()}"
            _remove(old)
            os.rename(final, old)
        os.rename(temp, final)
        if (directory / LATEST).is_dir() and not (directory / LATEST).is_symlink():
            shutil.rmtree(directory / LATEST)  # a damaged pointer (a directory in its place) gives way to the real one
        os.replace(latest, directory / LATEST)
        latest = None
        fsync_dir(directory)
        if old is not None:
            _remove(old)
    finally:
        for handle in handles:  # a failure before the syncs were issued: close what was opened
            handle.close()
        wait(syncs)  # on failure too: no file of this save is left open behind it
        if latest is not None:
            latest.unlink(missing_ok=True)
    return final


def _own(directory: Path) -> Path:
    """``directory``, a checkpoints directory (or none yet), unless something else stands there: its
    leftovers are deleted and new checkpoints written into it, which must never happen wherever a link
    planted there points; and a file or a FIFO there is no proof that the run had checkpoints off."""
    kind = foreign(directory, directory=True)
    if kind is not None:
        raise CheckpointError(Problem(str(directory), f"{kind} in place of the run's own checkpoints "
                                      "directory: checkpoints are read and written only inside the run, never where "
                                      "a link points; restore the directory or remove what is there"))
    return directory


def _remove(path: Path) -> None:
    """Remove what is at ``path`` (a checkpoint directory, or anything damage left in its place)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


_POOL: ThreadPoolExecutor | None = None


def _workers() -> ThreadPoolExecutor:
    """The threads that sync and hash for :func:`save`, started on first use and kept (starting
    them per save cost more than a small checkpoint's syncs)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=6, thread_name_prefix="esper-checkpoint")
    return _POOL


def _digest(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _filled(handle: BinaryIO, data: bytes) -> BinaryIO:
    """Write ``data`` to a new file's ``handle`` and return it still open, for its fsync elsewhere."""
    try:
        handle.write(data)
        handle.flush()
    except BaseException:
        handle.close()
        raise
    return handle


def _sync_and_close(handle: BinaryIO) -> None:
    try:
        os.fsync(handle.fileno())
    finally:
        handle.close()


def file_entries(payloads: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """The manifest entries (sha256 and size) of files about to be written; :func:`read_verified` checks them."""
    return {name: _digest(data) for name, data in payloads.items()}


def recover(directory: Path) -> list[Path]:
    """Move back a checkpoint that a crash during :func:`save` left set aside (``.old-step-N-*``
    while ``step-N`` is missing): it was complete when it was moved. Returns what was restored."""
    restored = []
    if directory.is_dir():
        for path in sorted(directory.glob(f"{OLD_PREFIX}step-*")):
            name = path.name[len(OLD_PREFIX):].rsplit("-", 1)[0]
            if _NAME.match(name) and not (directory / name).exists() and path.is_dir() and not path.is_symlink():
                os.rename(path, directory / name)
                restored.append(directory / name)
        if restored:
            fsync_dir(directory)
    return restored


def remove_leftovers(directory: Path) -> list[Path]:
    """Finish what a crash during a save or a retention left: restore a set-aside checkpoint whose
    replacement never arrived, then delete temporary, set-aside and half-deleted directories."""
    recover(directory)
    removed = []
    if directory.is_dir():
        for prefix in (TEMP_PREFIX, OLD_PREFIX, TRASH_PREFIX):
            for path in directory.glob(f"{prefix}*"):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                removed.append(path)
    return removed


def committed(directory: Path) -> list[Path]:
    """Committed checkpoint directories, oldest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if p.is_dir() and _NAME.match(p.name)), key=lambda p: p.name)


def retain(directory: Path, keep: int, metric: Callable[[dict[str, Any]], float | None]) -> list[Path]:
    """Keep the newest ``keep`` checkpoints plus the best by ``metric`` (lower is better); delete the
    rest. Runs only after a commit, so a crash here never leaves fewer checkpoints than intended; a
    doomed checkpoint is renamed out of the ``step-*`` namespace before it is deleted, so a crash
    mid-delete leaves only a ``.trash-*`` directory that :func:`remove_leftovers` finishes."""
    paths = committed(directory)
    keep_set = set(paths[-keep:])
    scored = [(m, p) for p in paths if (m := metric(_read_manifest_quietly(p))) is not None]
    if scored:
        keep_set.add(min(scored, key=lambda item: item[0])[1])
    removed = [p for p in paths if p not in keep_set]
    for path in removed:
        trash = directory / f"{TRASH_PREFIX}{path.name}-{os.getpid()}"
        os.rename(path, trash)
        shutil.rmtree(trash)
    return removed


def _read_manifest_quietly(path: Path) -> dict[str, Any]:
    try:
        manifest = parse_json(read_regular(path / MANIFEST, MAX_MANIFEST_BYTES), MAX_MANIFEST_BYTES)
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _read_file(path: Path, limit: int) -> bytes:
    """A checkpoint file's bytes: a regular file of at most ``limit`` bytes, else a located problem."""
    try:
        return read_regular(path, limit)
    except FileNotFoundError:
        raise CheckpointError(Problem(str(path), "missing: the checkpoint is incomplete")) from None
    except UnsafeInput as exc:
        raise CheckpointError(Problem(str(path), str(exc))) from None


def read_verified(path: Path, files: dict[str, Any]) -> dict[str, bytes]:
    """The bytes of each file a manifest lists (``{name: {"sha256", "bytes"}}``) under ``path``, each
    checked against its size and sha256 before anyone parses it; raises :class:`CheckpointError`
    naming the first file that is missing or differs."""
    data: dict[str, bytes] = {}
    for filename, expected in files.items():
        file_path = path / filename
        blob = _read_file(file_path, int(expected["bytes"]))
        if len(blob) != expected["bytes"] or hashlib.sha256(blob).hexdigest() != expected["sha256"]:
            raise CheckpointError(Problem(str(file_path), "sha256 does not match the manifest (truncated, "
                                          "corrupted or swapped)"))
        data[filename] = blob
    return data


def load(path: Path) -> Checkpoint:
    """Verify every file of a checkpoint against its manifest, then parse it (safetensors and JSON only)."""
    if path.is_symlink() or not path.is_dir():
        what = "a symbolic link" if path.is_symlink() else "missing" if not path.exists() else "not a directory"
        raise CheckpointError(Problem(str(path), f"not a checkpoint directory ({what})"))
    manifest_path = path / MANIFEST
    raw_manifest = _read_file(manifest_path, MAX_MANIFEST_BYTES)
    try:
        manifest = parse_json(raw_manifest, MAX_MANIFEST_BYTES)
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict) or set(files) != {TENSORS, STATE}:
            raise ValueError("unexpected format or file list")
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
        if any(size < 0 or size > MAX_FILE_BYTES for size, _ in expected.values()):
            raise ValueError(f"a file size outside 0..{MAX_FILE_BYTES}")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(Problem(str(manifest_path), f"unreadable manifest ({exc})")) from None
    data = read_verified(path, files)
    try:
        tensors = load_safetensors(data[TENSORS])
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(Problem(str(path / TENSORS), f"not a valid safetensors file ({exc})")) from None
    try:
        state = parse_json(data[STATE], MAX_FILE_BYTES)
    except ValueError as exc:
        raise CheckpointError(Problem(str(path / STATE), f"not valid JSON ({exc})")) from None
    if not isinstance(state, dict):
        raise CheckpointError(Problem(str(path / STATE), "not a JSON object"))
    return Checkpoint(path, manifest, tensors, state)


def find(target: Path, strict: bool, warn: Callable[[str], None]) -> Checkpoint:
    """The checkpoint to resume from: ``target`` itself if it is a checkpoint directory, else the
    run's ``LATEST``; when that fails verification, the next older one (with a warning), unless
    ``strict``."""
    if _NAME.match(target.name) and target.parent.name == "checkpoints":
        directory, first = _own(target.parent), target
        if not target.exists():  # e.g. pruned by retention: say which ones there are
            found = ", ".join(p.name for p in committed(directory)) or "none"
            raise CheckpointError(Problem(str(target), f"no such checkpoint (the run has: {found})"))
    else:
        directory = _own(target / "checkpoints")
        if not directory.is_dir():
            message = _no_checkpoint(target) if _looks_like_run(target) else \
                "no checkpoints directory: not a run directory or checkpoint"
            raise CheckpointError(Problem(str(target), message))
        recover(directory)
        first = _latest(directory, strict, warn)
    candidates = committed(directory)
    if first is not None:
        candidates = [c for c in candidates if c.name <= first.name]
        if first not in candidates:
            candidates.append(first)
    candidates.sort(key=lambda p: p.name, reverse=True)
    if not candidates:
        run = directory.parent
        raise CheckpointError(Problem(str(directory), _no_checkpoint(run) if _looks_like_run(run)
                                      else "holds no committed checkpoint"))
    failures, skipped = [], []
    for candidate in candidates:
        try:
            found = load(candidate)
        except CheckpointError as exc:
            if strict:
                raise
            failures.extend(exc.problems)
            skipped.append(f"warning: skipping checkpoint {candidate.name}: {exc.problems[0]}")
            continue
        for message in skipped:  # said only when an older one is used: if none is, the error names each
            warn(message)
        return found
    raise CheckpointError(failures)


def _looks_like_run(path: Path) -> bool:
    return (path / "events.jsonl").is_file() or (path / "recipe.yaml").is_file()


def _latest(directory: Path, strict: bool, warn: Callable[[str], None]) -> Path | None:
    """The checkpoint ``LATEST`` names, or ``None`` (with a warning, or an error if ``strict``) when
    it is unreadable or names something that is not a checkpoint."""
    pointer = directory / LATEST
    if not pointer.exists() and not pointer.is_symlink():
        return None
    try:
        name = read_regular(pointer, 64).decode("ascii").strip()
        if not _NAME.match(name):
            raise UnsafeInput(f"does not name a checkpoint ({name[:40]!r})")
    except (OSError, UnicodeDecodeError, UnsafeInput) as exc:
        problem = Problem(str(pointer), f"unreadable ({exc}); falling back to the newest checkpoint directory")
        if strict:
            raise CheckpointError(problem) from None
        warn(f"warning: {problem}")
        return None
    return directory / name
