"""Where a run's hash-chained events are stored, behind two small interfaces.

:class:`EventStore` is the write side the trainer needs (append, head, close); :class:`EventSource`
is the read side that auditing and reports need (the records exactly as stored, plus the head hash
anchored outside the log). The run directory implements both today (``events.jsonl`` through
:class:`~esper_core.telemetry.jsonl.EventLog`, :class:`RunDirEvents` here, anchored by
``summary.json``); the SQL asset repository will implement them too, storing each record's exact
text, so one audit covers both.

Records are hashed as the exact bytes stored, never re-serialised: a re-encoding that changed one
byte would otherwise pass for the original.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from esper_core.errors import EsperError, Problem


class RunDirError(EsperError):
    """A path that is not a readable run directory, or a run file that cannot be parsed."""

    exit_code = 2


@dataclass(frozen=True)
class StoredEvent:
    """One record as stored: where it is (a line number, or a row id) and its exact bytes."""

    where: int
    raw: bytes

    def parse(self) -> dict[str, Any] | None:
        """The record, or ``None`` if it is not a JSON object (a damaged or hand-edited line)."""
        try:
            record = json.loads(self.raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return record if isinstance(record, dict) else None


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


class RunDirEvents:
    """``events.jsonl`` of a run directory, anchored by ``summary.json``'s ``events_head``."""

    def __init__(self, run_dir: Path) -> None:
        if not run_dir.is_dir():
            raise RunDirError(Problem(str(run_dir), "not a directory (expected a run directory written by "
                                                    "`esper train`, e.g. runs/quickstart)"))
        self.path = run_dir / "events.jsonl"
        if not self.path.is_file():
            raise RunDirError(Problem(str(run_dir), "not a run directory: it has no events.jsonl"))
        self.summary_path = run_dir / "summary.json"
        self.name = str(self.path)

    def stored(self) -> Iterator[StoredEvent]:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()  # the newline that ends the last record
        for number, raw in enumerate(lines, start=1):
            yield StoredEvent(number, raw)

    def anchor(self) -> str | None:
        summary = read_json(self.summary_path)
        if summary is None:
            return None
        head = summary.get("events_head")
        return head if isinstance(head, str) else None


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file of a run; ``None`` if absent, a located :class:`RunDirError` if malformed."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RunDirError(Problem(str(path), f"not UTF-8 text ({exc.reason})")) from None
    except json.JSONDecodeError as exc:
        raise RunDirError(Problem(str(path), f"not valid JSON: {exc.msg}", line=exc.lineno)) from None
    if not isinstance(value, dict):
        raise RunDirError(Problem(str(path), "expected a JSON object"))
    return value
