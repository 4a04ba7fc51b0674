"""Where a run's hash-chained events are stored, behind two small interfaces.

:class:`EventStore` is the write side the trainer needs (append, head, close); :class:`EventSource`
is the read side that auditing and reports need (the records exactly as stored, plus the head hash
anchored outside the log). The run directory implements both today (``events.jsonl`` through
:class:`~esper_core.telemetry.jsonl.EventLog`, :class:`RunDirEvents` here, anchored by
``summary.json``); the SQL asset repository will implement them too, storing each record's exact
text, so one audit covers both.

Records are hashed as the exact bytes stored, never re-serialised: a re-encoding that changed one
byte would otherwise pass for the original. Reading is bounded (see :mod:`esper_core.safe_read`): a
line longer than :data:`MAX_LINE_BYTES` or nested deeper than ``MAX_JSON_DEPTH`` is a damaged
record, named by its line, and a log larger than :data:`MAX_LOG_BYTES` is refused whole.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from esper_core.errors import EsperError, Problem
from esper_core.safe_read import UnsafeInput, parse_json, read_regular
from esper_core.telemetry.jsonl import MAX_LINE_BYTES

MAX_LOG_BYTES = 1 << 30
MAX_RUN_JSON_BYTES = 16 << 20
"""Largest ``summary.json`` or checkpoint manifest a report reads."""


class RunDirError(EsperError):
    """A path that is not a readable run directory, or a run file that cannot be parsed."""

    exit_code = 2


class AuditError(EsperError):
    """The run's files fail verification: edited, deleted, swapped or damaged."""

    exit_code = 4


@dataclass(frozen=True)
class StoredEvent:
    """One record as stored: where it is (a line number, or a row id) and its exact bytes."""

    where: int
    raw: bytes
    oversized: bool = False
    """The line was longer than :data:`MAX_LINE_BYTES`; ``raw`` holds only its start."""

    def parse(self) -> dict[str, Any] | None:
        """The record, or ``None`` if it is not a JSON object (a damaged or hand-edited line)."""
        return self.decode()[0]

    def decode(self) -> tuple[dict[str, Any] | None, str | None]:
        """The record and ``None``, or ``None`` and why the line is not a record."""
        if self.oversized:
            return None, f"the line is longer than {MAX_LINE_BYTES} bytes"
        try:
            record = parse_json(self.raw, MAX_LINE_BYTES)
        except UnsafeInput as exc:
            return None, f"the line is {exc}"
        except ValueError:
            return None, "not valid JSON"
        return (record, None) if isinstance(record, dict) else (None, "not a JSON object")


class EventStore(Protocol):
    """Write side: append-only, each record chained to the one before it."""

    def append(self, record: dict[str, Any]) -> dict[str, Any]: ...

    @property
    def head(self) -> str: ...

    def close(self) -> None: ...


class EventSource(Protocol):
    """Read side, for audits and reports."""

    name: str
    """How problems name the store, e.g. ``runs/x/events.jsonl``."""

    def stored(self) -> Iterator[StoredEvent]: ...

    def anchor(self) -> str | None:
        """The head hash recorded outside the log when the run ended, or ``None`` if there is none."""
        ...


RUN_FILES = ("recipe.yaml", "summary.json", "metrics.jsonl")
"""Files besides the event log that only a run directory holds."""


class RunDirEvents:
    """``events.jsonl`` of a run directory, anchored by ``summary.json``'s ``events_head``."""

    def __init__(self, run_dir: Path) -> None:
        if not run_dir.is_dir():
            raise RunDirError(Problem(str(run_dir), "not a directory (expected a run directory written by "
                                                    "`esper train`, e.g. runs/quickstart)"))
        self.path = run_dir / "events.jsonl"
        if not self.path.exists() and not self.path.is_symlink():
            if any((run_dir / name).exists() for name in RUN_FILES):
                raise AuditError(Problem(str(self.path), "missing: the run's other files are here, its event "
                                                         "log was deleted"))
            raise RunDirError(Problem(str(run_dir), "not a run directory: it has no events.jsonl"))
        status = os.lstat(self.path)
        if not stat.S_ISREG(status.st_mode):
            raise AuditError(Problem(str(self.path), "not a regular file (a link, FIFO, device or directory "
                                                     "was put in its place)"))
        if status.st_size > MAX_LOG_BYTES:
            raise AuditError(Problem(str(self.path), f"{status.st_size} bytes: larger than the {MAX_LOG_BYTES} "
                                                     "bytes an event log may have; it was padded or replaced"))
        self.summary_path = run_dir / "summary.json"
        self.name = str(self.path)

    def stored(self) -> Iterator[StoredEvent]:
        with self.path.open("rb") as handle:
            number = 0
            while line := handle.readline(MAX_LINE_BYTES + 1):
                number += 1
                if len(line) <= MAX_LINE_BYTES:
                    yield StoredEvent(number, line.removesuffix(b"\n"))
                    continue
                start = line[:MAX_LINE_BYTES]  # too long to be a record: keep its start, skip the rest
                while line and not line.endswith(b"\n"):
                    line = handle.readline(MAX_LINE_BYTES)
                yield StoredEvent(number, start, oversized=True)

    def anchor(self) -> str | None:
        summary = read_json(self.summary_path)
        if summary is None:
            return None
        head = summary.get("events_head")
        return head if isinstance(head, str) else None


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file of a run; ``None`` if absent, a located :class:`RunDirError` if malformed,
    not a regular file, too large or too deeply nested."""
    if not path.exists() and not path.is_symlink():
        return None
    try:
        value = parse_json(read_regular(path, MAX_RUN_JSON_BYTES), MAX_RUN_JSON_BYTES)
    except UnsafeInput as exc:
        raise RunDirError(Problem(str(path), str(exc))) from None
    except json.JSONDecodeError as exc:
        raise RunDirError(Problem(str(path), f"not valid JSON: {exc.msg}", line=exc.lineno)) from None
    if not isinstance(value, dict):
        raise RunDirError(Problem(str(path), "expected a JSON object"))
    return value
