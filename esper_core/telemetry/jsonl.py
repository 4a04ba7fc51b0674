"""Append-only JSON-lines files: the run's metrics stream and its hash-chained event log.

Each event carries ``prev`` (the sha256 of the previous line as written) and ``seq``, so deleting,
reordering or editing any record breaks the chain at that point; ``esper report --verify`` walks it.
Lines are flushed as written so a crash loses at most the line being written. Both are opened
without following a link (a resume appends to the logs of a run directory that may come from
someone else), so a link, a FIFO or a file with other names (a hard link) in their place is refused
(:func:`esper_core.safe_read.open_run_file`, exit 3), never a write elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from esper_core.safe_read import foreign, open_run_file, parse_json

GENESIS = "0" * 64
MAX_LINE_BYTES = 1 << 20
"""Longest line a reader accepts (Esper's longest records, decisions with their inputs, are a few KB)."""


class JsonlWriter:
    """One JSON object per line, keys sorted, flushed per line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._final_size = 0
        self._file = os.fdopen(open_run_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8")

    def cut(self, size: int) -> None:
        """Truncate the file to ``size`` bytes (a resume drops what was logged after its checkpoint)
        through this descriptor, the one that was checked, never by opening the path again."""
        self._file.flush()
        os.ftruncate(self._file.fileno(), size)

    @property
    def size(self) -> int:
        """Bytes written so far, of the file this writer holds (not whatever the path names now); after
        :meth:`close`, what it held then (a checkpoint of a finished run still records where its logs end)."""
        if self._file.closed:
            return self._final_size
        self._file.flush()
        return os.fstat(self._file.fileno()).st_size

    def replaced(self) -> str | None:
        """What stands at the path now if it is no longer the file this writer holds (something was
        swapped in while the run wrote it), else ``None``. A checkpoint whose log cursor counted a file
        that is not the run's would resume against the wrong log, so the run stops first."""
        held = os.fstat(self._file.fileno())
        try:
            now = os.lstat(self.path)
        except FileNotFoundError:
            return "nothing (the file was removed)"
        if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return None
        return foreign(self.path) or "another file"

    def write(self, record: dict[str, Any]) -> str:
        line = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=True)
        self._file.write(line + "\n")
        self._file.flush()
        return line

    def close(self) -> None:
        if not self._file.closed:
            self._final_size = self.size
        self._file.close()


class EventLog(JsonlWriter):
    """Lifecycle and policy events, each chained to the one before it.

    The run directory's implementation of :class:`esper_core.telemetry.events.EventStore`.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.seq = 0
        self.prev = GENESIS

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        full = {"seq": self.seq, "time": round(time.time(), 6), "prev": self.prev, **record}
        line = self.write(full)
        self.last_line = line  # mirrored verbatim into the asset repository
        self.prev = hashlib.sha256(line.encode("utf-8")).hexdigest()
        self.seq += 1
        return full

    @property
    def head(self) -> str:
        """sha256 of the last line written (``GENESIS`` when empty): what ``summary.json`` anchors."""
        return self.prev


def verify_chain(path: Path) -> int | None:
    """Return the ``seq`` position of the first record that breaks the chain, or ``None`` if intact.

    The quick check of the links alone; :func:`esper_core.telemetry.audit.audit` also checks the last
    record against ``summary.json`` and says which record was tampered with and how.
    """
    prev = GENESIS
    for position, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        try:
            record = parse_json(line, MAX_LINE_BYTES)
        except ValueError:  # malformed, too long or too deep: the chain breaks here
            return position
        if not isinstance(record, dict) or record.get("seq") != position or record.get("prev") != prev:
            return position
        prev = hashlib.sha256(line.encode("utf-8")).hexdigest()
    return None
