"""Audit of a hash-chained event log: is this the history the run wrote, unedited?

Each record stores ``seq`` (its position) and ``prev`` (the sha256 of the record before it, as
stored); the run's ``summary.json`` stores ``events_head``, the sha256 of the last record. So:

- a reordered, inserted or deleted record has the wrong ``seq`` at its position;
- an edited record no longer hashes to the ``prev`` its successor stores (or, for the last record,
  to ``events_head``): the edit is detected at the edited record, not only at the next one;
- a deleted last record leaves a log whose head no longer equals ``events_head``.

The first problem is reported as ``FILE:LINE: record seq N: what is wrong``. A log without an
anchor (no ``summary.json``: the run did not finish, or the file was removed) cannot prove its
tail and fails too, saying so. Rewriting every hash after an edit, summary included, is not
detectable without a key; signing the head is the asset repository's job.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper_core.errors import EsperError, Problem
from esper_core.telemetry.events import EventSource, RunDirEvents, StoredEvent, read_json
from esper_core.telemetry.jsonl import GENESIS


class AuditError(EsperError):
    """The event log fails verification."""

    exit_code = 4


@dataclass(frozen=True)
class ChainBreak:
    """The first record found bad: where it is, its ``seq`` (as stored, else its position) and why."""

    where: int
    seq: int
    message: str

    def problem(self, name: str) -> Problem:
        return Problem(name, f"record seq {self.seq}: {self.message}", line=self.where)


@dataclass(frozen=True)
class AuditResult:
    name: str
    records: int
    head: str
    anchor: str | None
    first_break: ChainBreak | None

    @property
    def ok(self) -> bool:
        return self.first_break is None

    def describe(self) -> str:
        if self.first_break is not None:
            return str(self.first_break.problem(self.name))
        return f"{self.name}: {self.records} records, chain intact, head {self.head} matches summary.json"

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "head": self.head, "anchor": self.anchor,
                "detail": self.describe()}


def audit(source: EventSource) -> AuditResult:
    """Walk the whole log once; see the module docstring for what each problem means."""
    stored = list(source.stored())
    anchor = source.anchor()
    hashes = [hashlib.sha256(s.raw).hexdigest() for s in stored]
    records = [s.parse() for s in stored]
    head = hashes[-1] if hashes else GENESIS
    return AuditResult(source.name, len(stored), head, anchor, _first_break(stored, records, hashes, anchor))


def _first_break(stored: list[StoredEvent], records: list[dict[str, Any] | None], hashes: list[str],
                 anchor: str | None) -> ChainBreak | None:
    n = len(stored)

    def link_broken(i: int) -> bool:
        """Whether the link out of record ``i`` (to record i+1, or to the anchor) is broken."""
        if i + 1 < n:
            nxt = records[i + 1]
            return nxt is not None and nxt.get("prev") != hashes[i]
        return anchor is not None and anchor != hashes[i]

    for i, (entry, record) in enumerate(zip(stored, records)):
        if record is None:
            return ChainBreak(entry.where, i, "not a JSON object: the line was damaged or edited")
        seq = record.get("seq")
        if seq != i:
            shown = seq if isinstance(seq, int) and not isinstance(seq, bool) else i
            return ChainBreak(entry.where, shown, f"found at position {i} (expected seq {i}): records were "
                              "deleted, inserted or reordered here, or this record's seq was edited")
        if record.get("prev") == (hashes[i - 1] if i else GENESIS):
            continue
        if i == 0:
            return ChainBreak(entry.where, 0, "prev is not the genesis hash: records were removed from the start "
                              "or this record was edited")
        if link_broken(i):  # both of its links are broken: this record itself was changed
            return ChainBreak(entry.where, i, "prev does not match the hash of the record before it, and the "
                              "record no longer matches the hash stored after it: this record was edited")
        return ChainBreak(stored[i - 1].where, i - 1, f"content does not match the hash stored in the next record "
                          f"(seq {i}): this record was edited")
    if anchor is None:
        where = stored[-1].where if stored else 1
        return ChainBreak(where, max(n - 1, 0), "summary.json has no events_head to check the last record "
                          "against (the run did not finish, or summary.json was removed)")
    if anchor != (hashes[-1] if hashes else GENESIS):
        if not stored:
            return ChainBreak(1, 0, "the log is empty but summary.json's events_head names a record")
        return ChainBreak(stored[-1].where, n - 1, "hash does not match summary.json's events_head: this record "
                          "was edited, or records after it were deleted")
    return None


def recipe_problem(run_dir: Path) -> Problem | None:
    """``recipe.yaml`` must hash to the sha256 the run recorded: in ``recipe.sha256``, in its first
    event and in ``summary.json``. Otherwise the report would describe a recipe the run never used."""
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return Problem(str(path), "missing: the run's recipe cannot be checked")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    first = next(iter(RunDirEvents(run_dir).stored()), None)
    start = first.parse() if first is not None else None
    hash_file = run_dir / "recipe.sha256"
    recorded = {
        "recipe.sha256": hash_file.read_text(encoding="utf-8").strip() if hash_file.is_file() else None,
        "the first event": (start or {}).get("recipe_sha256"),
        "summary.json": (read_json(run_dir / "summary.json") or {}).get("recipe_sha256"),
    }
    differing = [where for where, value in recorded.items() if value is not None and value != actual]
    if differing:
        return Problem(str(path), f"sha256 {actual} does not match the hash recorded in {', '.join(differing)}: "
                                  "the recipe was edited after the run")
    return None
