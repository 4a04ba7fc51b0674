"""One process at a time per run directory.

Two ``esper resume`` of one run would truncate each other's logs and delete each other's temporary
checkpoints. :class:`RunLock` takes an exclusive, non-blocking ``flock`` on ``<run>/.lock`` for as
long as a process writes the run; a second process gets a :class:`CheckpointError` (exit 3) naming
the holder's pid at once instead of waiting or corrupting. The kernel drops the lock when the
holder exits, however it exits (kill -9 included), so a stale lock file never blocks a resume.

The lock file is truncated and written in place (the holder's pid), so it is opened like a run's logs
(:func:`esper_core.safe_read.open_run_file`): a symbolic link, a FIFO or a file with other names (a
hard link) in its place is refused, exit 3, rather than written through to a file outside the run.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from esper_core.errors import CheckpointError, Problem
from esper_core.safe_read import open_run_file

LOCK_FILE = ".lock"


class RunLock:
    """``with RunLock(run_dir): ...`` holds the run for this process; see the module docstring."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._descriptor: int | None = None

    def acquire(self) -> None:
        descriptor = open_run_file(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(descriptor)
            raise CheckpointError(Problem(str(self.path.parent), f"run is in use by pid {holder} (another "
                                          "`esper train` or `esper resume` of this run); wait for it to finish "
                                          "or stop it first")) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self._descriptor = descriptor

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the descriptor drops the flock
            self._descriptor = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()
