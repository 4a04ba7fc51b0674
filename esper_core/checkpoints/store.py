"""Checkpoint directories on disk: atomic commit, verification before parsing, retention.

A checkpoint is ``<run>/checkpoints/step-NNNNNNNN/`` holding ``tensors.safetensors`` (model,
optimizer and RNG tensors), ``state.json`` (everything else) and ``manifest.json`` (sha256 and size
of every other file, versions, step, recipe hash). It is written into a temporary sibling
directory, every file and the directory are fsynced, the directory is renamed into place, the
parent is fsynced, and only then is ``LATEST`` replaced. A reader therefore sees either a whole
checkpoint or none, and a checkpoint whose bytes changed after the commit fails its hashes before
a single byte of it is parsed. Nothing here ever unpickles.
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
from safetensors.torch import save_file as save_tensors

from esper_core.durable import fsync_dir
from esper_core.errors import CheckpointError, Problem

TENSORS = "tensors.safetensors"
STATE = "state.json"
MANIFEST = "manifest.json"
LATEST = "LATEST"
FORMAT = 1
MAX_JSON_BYTES = 64 << 20
_NAME = re.compile(r"^step-(\d{8})$")


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
    2. after the rename, the parent directory is fsynced, so the checkpoint is durably committed
       before ``LATEST`` can name it;
    3. after ``LATEST`` is replaced, the parent directory is fsynced again, so the pointer is durable.

    The five fsyncs of step 1 are independent of one another, so they are issued together from
    worker threads (the file system commits them in one journal transaction where it can: on ext4
    here, three files and a directory synced together took the time of one). The tensors are
    streamed to their file by ``safetensors`` (no copy of them in memory) and the file's sha256 is
    read back from the page cache on a worker while it is being synced (hashlib releases the GIL).
    The two directory fsyncs of steps 2 and 3 are ordered after the renames they make durable."""
    directory.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = directory / name
    temp = directory / f".tmp-{name}-{os.getpid()}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir()
    state_bytes = json.dumps(state, sort_keys=True).encode("utf-8")
    pool, latest = _workers(), None
    syncs: list[Future[None]] = []
    try:
        save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(temp / TENSORS))
        syncs.append(pool.submit(_sync_and_close, open(temp / TENSORS, "rb+")))
        digests = {TENSORS: pool.submit(_file_digest, temp / TENSORS), STATE: pool.submit(_digest, state_bytes)}
        syncs.append(pool.submit(_sync_and_close, _filled(open(temp / STATE, "wb"), state_bytes)))
        files = {filename: digest.result() for filename, digest in digests.items()}
        manifest = {"format": FORMAT, "step": step, "files": files, "python": sys.version.split()[0],
                    "torch": torch.__version__, **info}
        text = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
        syncs.append(pool.submit(_sync_and_close, _filled(open(temp / MANIFEST, "wb"), text)))
        descriptor, path = tempfile.mkstemp(prefix=f".{LATEST}-", suffix=".tmp", dir=directory)
        latest = Path(path)
        syncs.append(pool.submit(_sync_and_close, _filled(os.fdopen(descriptor, "wb"), (name + "\n").encode())))
        syncs.append(pool.submit(fsync_dir, temp))
        for sync in syncs:
            sync.result()  # an fsync that failed fails the save before anything is renamed
        if final.exists():  # a checkpoint of this step from before a crash: replace it whole
            shutil.rmtree(final)
        os.rename(temp, final)
        fsync_dir(directory)
        os.replace(latest, directory / LATEST)
        latest = None
        fsync_dir(directory)
    finally:
        wait(syncs)  # on failure too: no file of this save is left open behind it
        if latest is not None:
            latest.unlink(missing_ok=True)
    return final


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


def _file_digest(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        return {"sha256": hashlib.file_digest(handle, "sha256").hexdigest(), "bytes": os.fstat(handle.fileno()).st_size}


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


def remove_leftovers(directory: Path) -> list[Path]:
    """Delete temporary directories and pointers that a crash during a save left behind."""
    removed = []
    if directory.is_dir():
        for path in directory.glob(".tmp-*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
    return removed


def committed(directory: Path) -> list[Path]:
    """Committed checkpoint directories, oldest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if p.is_dir() and _NAME.match(p.name)), key=lambda p: p.name)


def retain(directory: Path, keep: int, metric: Callable[[dict[str, Any]], float | None]) -> list[Path]:
    """Keep the newest ``keep`` checkpoints plus the best by ``metric`` (lower is better); delete the
    rest. Runs only after a commit, so a crash here never leaves fewer checkpoints than intended."""
    paths = committed(directory)
    keep_set = set(paths[-keep:])
    scored = [(m, p) for p in paths if (m := metric(_read_manifest_quietly(p))) is not None]
    if scored:
        keep_set.add(min(scored, key=lambda item: item[0])[1])
    removed = [p for p in paths if p not in keep_set]
    for path in removed:
        shutil.rmtree(path)
    return removed


def _read_manifest_quietly(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _read_bounded(path: Path, limit: int) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(Problem(str(path), f"larger than {limit} bytes"))
    return data


def read_verified(path: Path, files: dict[str, Any]) -> dict[str, bytes]:
    """The bytes of each file a manifest lists (``{name: {"sha256", "bytes"}}``) under ``path``, each
    checked against its size and sha256 before anyone parses it; raises :class:`CheckpointError`
    naming the first file that is missing or differs."""
    data: dict[str, bytes] = {}
    for filename, expected in files.items():
        file_path = path / filename
        try:
            blob = _read_bounded(file_path, int(expected["bytes"]))
        except FileNotFoundError:
            raise CheckpointError(Problem(str(file_path), "missing")) from None
        if len(blob) != expected["bytes"] or hashlib.sha256(blob).hexdigest() != expected["sha256"]:
            raise CheckpointError(Problem(str(file_path), "sha256 does not match the manifest (truncated, "
                                          "corrupted or swapped)"))
        data[filename] = blob
    return data


def load(path: Path) -> Checkpoint:
    """Verify every file of a checkpoint against its manifest, then parse it (safetensors and JSON only)."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(_read_bounded(manifest_path, 1 << 20))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or set(files) != {TENSORS, STATE}:
            raise ValueError("unexpected format or file list")
    except FileNotFoundError:
        raise CheckpointError(Problem(str(manifest_path), "missing: the checkpoint is incomplete")) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(Problem(str(manifest_path), f"unreadable manifest ({exc})")) from None
    data = read_verified(path, files)
    try:
        tensors = load_safetensors(data[TENSORS])
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(Problem(str(path / TENSORS), f"not a valid safetensors file ({exc})")) from None
    try:
        state = json.loads(data[STATE])
    except ValueError as exc:
        raise CheckpointError(Problem(str(path / STATE), f"not valid JSON ({exc})")) from None
    return Checkpoint(path, manifest, tensors, state)


def find(target: Path, strict: bool, warn: Callable[[str], None]) -> Checkpoint:
    """The checkpoint to resume from: ``target`` itself if it is a checkpoint directory, else the
    run's ``LATEST``; when that fails verification, the next older one (with a warning), unless
    ``strict``."""
    if _NAME.match(target.name) and target.parent.name == "checkpoints":
        directory, first = target.parent, target
    else:
        directory = target / "checkpoints"
        first = None
        pointer = directory / LATEST
        if pointer.is_file():
            name = pointer.read_text(encoding="utf-8").strip()
            if _NAME.match(name):
                first = directory / name
    if not directory.is_dir():
        raise CheckpointError(Problem(str(target), "no checkpoints directory: not a run directory or checkpoint"))
    candidates = committed(directory)
    if first is not None:
        candidates = [c for c in candidates if c.name <= first.name]
        if first not in candidates:
            candidates.append(first)
    candidates.sort(key=lambda p: p.name, reverse=True)
    if not candidates:
        raise CheckpointError(Problem(str(directory), "holds no committed checkpoint"))
    failures = []
    for candidate in candidates:
        try:
            return load(candidate)
        except CheckpointError as exc:
            if strict:
                raise
            failures.extend(exc.problems)
            warn(f"warning: skipping checkpoint {candidate.name}: {exc.problems[0]}")
    raise CheckpointError(failures)
