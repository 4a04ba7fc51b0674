"""Durable file writes, shared by every store that must survive a crash (checkpoints, kernels,
selector statistics): write and fsync a file, fsync a directory so a rename in it is durable, and
replace a file atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_synced(path: Path, data: bytes, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` and fsync it; ``exclusive`` refuses to overwrite an existing file."""
    with open(path, "xb" if exclusive else "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a rename into it, a new file) durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_atomically(path: Path, data: bytes) -> None:
    """Readers of ``path`` see the old bytes or the new ones, never a mix, even across a crash."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    fsync_dir(path.parent)
