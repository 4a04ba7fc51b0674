"""Audit of a hash-chained event log: is this the history the run wrote, unedited?

Each record stores ``seq`` (its position) and ``prev`` (the sha256 of the record before it, as
stored); the run's ``summary.json`` stores ``events_head``, the sha256 of the last record. So:

- a reordered, inserted or deleted record has the wrong ``seq`` at its position;
- an edited record no longer hashes to the ``prev`` its successor stores (or, for the last record,
  to ``events_head``): the edit is detected at the edited record, not only at the next one;
- a deleted last record leaves a log whose head no longer equals ``events_head``.

The first problem is reported as ``FILE:LINE: record seq N: what is wrong``. A run that has not
finished (interrupted, still training, or being extended by a resume, which cuts the log back before
its ``run_end`` and removes its summary) has no ``summary.json`` to anchor its log: its chain passes
as *unfinished*, saying that its tail is not anchored yet, when the log has no ``run_end``. A log with
a ``run_end`` but no summary (the summary was removed) fails, saying so. The asset repository's copy
of the log (:mod:`.mirror_check`) still checks an unfinished run's records.

:func:`verify_run` is the whole ``esper report --verify``: this chain walk, the recipe's hashes
(original in ``run_start``, effective after resume overrides in the last ``run_resume``), the
results bound in ``run_end`` and the signed head (:mod:`.binding`), and the asset repository's
copy of the events (:mod:`.mirror_check`). Rewriting every hash after an edit, summary included, is
caught by the signature (with ``ESPER_SIGNING_KEY``) or by the repository's copy. Without them a
consistent chain proves nothing against such a rewrite: :attr:`RunVerification.evidence` says which
proof a run has, so no output calls an unsigned or unchecked log verified.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper_core.errors import Problem
from esper_core.safe_read import UnsafeInput, read_regular, sha256_regular
from esper_core.telemetry.binding import Signature, binding_problems, evidence
from esper_core.telemetry.events import AuditError, EventSource, RunDirError, RunDirEvents, StoredEvent, read_json
from esper_core.telemetry.jsonl import GENESIS
from esper_core.telemetry.mirror_check import repository_problems

__all__ = ["AuditError", "AuditResult", "ChainBreak", "RunVerification", "audit", "recipe_problem", "verify_run"]


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
    unfinished: bool = False
    """The run has not finished: no summary anchors the log's last record yet."""

    @property
    def ok(self) -> bool:
        return self.first_break is None

    def describe(self) -> str:
        if self.first_break is not None:
            return str(self.first_break.problem(self.name))
        if self.unfinished:
            return (f"{self.name}: {self.records} records, hash chain consistent; the run has not finished, so no "
                    "summary anchors its last record yet")
        return f"{self.name}: {self.records} records, hash chain consistent, head {self.head} matches summary.json"

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "head": self.head, "anchor": self.anchor,
                "unfinished": self.unfinished, "detail": self.describe()}


def audit(source: EventSource) -> AuditResult:
    """Walk the whole log once; see the module docstring for what each problem means."""
    return _walk(source, list(source.stored()))[0]


def _walk(source: EventSource, stored: list[StoredEvent]) -> tuple[AuditResult, list[dict[str, Any] | None]]:
    try:
        anchor = source.anchor()
    except RunDirError as exc:  # summary.json damaged, nested, replaced: tampering, not a usage error
        raise AuditError(exc.problems) from None
    hashes = [hashlib.sha256(s.raw).hexdigest() for s in stored]
    decoded = [s.decode() for s in stored]
    records = [record for record, _ in decoded]
    head = hashes[-1] if hashes else GENESIS
    unfinished = _unfinished(records, anchor)
    broken = _first_break(stored, records, [why for _, why in decoded], hashes, anchor, unfinished)
    return AuditResult(source.name, len(stored), head, anchor, broken, unfinished and broken is None), records


def _unfinished(records: list[dict[str, Any] | None], anchor: str | None) -> bool:
    """Whether the run has not finished: no summary anchors the log, and no ``run_end`` is in it (an
    interrupted run, one still training, or a finished one being extended, whose resume cut the log
    back before its ``run_end`` and removed its summary). Otherwise the log must end at the anchor."""
    return bool(records) and anchor is None and not any(r is not None and r.get("event") == "run_end" for r in records)


def _first_break(stored: list[StoredEvent], records: list[dict[str, Any] | None], defects: list[str | None],
                 hashes: list[str], anchor: str | None, unfinished: bool) -> ChainBreak | None:
    n = len(stored)

    def link_broken(i: int) -> bool:
        """Whether the link out of record ``i`` (to record i+1, or to the anchor) is broken."""
        if i + 1 < n:
            nxt = records[i + 1]
            return nxt is not None and nxt.get("prev") != hashes[i]
        return anchor is not None and anchor != hashes[i]

    for i, (entry, record) in enumerate(zip(stored, records)):
        if record is None:
            return ChainBreak(entry.where, i, f"not a JSON object ({defects[i]}): the line was damaged or edited")
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
    if unfinished:
        return None  # no summary can anchor the log of a run that has not finished (see _unfinished)
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


def recipe_problem(run_dir: Path, records: list[dict[str, Any] | None]) -> Problem | None:
    """``recipe.yaml`` (the recipe as first run) must hash to the sha256 in ``recipe.sha256`` and in
    the ``run_start`` event; ``summary.json``'s hash is the recipe the run ended with, which is that
    of the last ``run_start`` / ``run_resume`` event (a resume with overrides records the hash of the
    recipe with its overrides). Otherwise the report would describe a recipe the run never used."""
    path = run_dir / "recipe.yaml"
    try:
        actual = sha256_regular(path)
    except FileNotFoundError:
        return Problem(str(path), "missing: the run's recipe cannot be checked")
    except (UnsafeInput, OSError) as exc:
        return Problem(str(path), f"{exc}: the run's recipe cannot be checked")
    known = [r for r in records if r is not None]
    last_end = max((i for i, r in enumerate(known) if r.get("event") == "run_end"), default=len(known))
    starts = [r for r in known[:last_end] if r.get("event") in ("run_start", "run_resume")]
    first = next((r for r in known if r.get("event") == "run_start"), {})
    # summary.json is written by the segment that recorded the last run_end (an extension that has not
    # finished yet has not replaced it): its recipe is the one of the last start before that run_end
    effective = next((r["recipe_sha256"] for r in reversed(starts) if "recipe_sha256" in r), actual)
    hash_file = run_dir / "recipe.sha256"
    try:
        written = read_regular(hash_file, 1024).decode("ascii").strip()
    except FileNotFoundError:
        return Problem(str(hash_file), "missing: deleted after the run (every run writes it)")
    except (UnsafeInput, OSError, UnicodeDecodeError) as exc:
        return Problem(str(hash_file), f"unreadable ({exc})")
    try:
        summary = read_json(run_dir / "summary.json") or {}
    except RunDirError as exc:
        return exc.problems[0]
    differing = [where for where, value, expected in (
        ("recipe.sha256", written, actual), ("the run_start event", first.get("recipe_sha256"), actual),
        ("summary.json", summary.get("recipe_sha256"), effective)) if value is not None and value != expected]
    if differing:
        return Problem(str(path), f"sha256 {actual} does not match the hash recorded in {', '.join(differing)}: "
                                  "the recipe was edited after the run, or the record was")
    return None


@dataclass
class RunVerification:
    """Everything ``esper report --verify`` found: the chain, then located problems, notes and the
    head signature's state (``None`` when the chain is broken and it was not looked at)."""

    chain: AuditResult
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    signature: Signature | None = None

    @property
    def ok(self) -> bool:
        return self.chain.ok and not self.problems

    @property
    def tamper_evident(self) -> bool:
        """Whether a rewrite of the log would have been detected: only a signature checked with the key
        proves that (a consistent chain is no proof: anyone can recompute it)."""
        return self.ok and self.signature == "verified"

    @property
    def evidence(self) -> str | None:
        """What the run's log proves against tampering, in one sentence (see :func:`binding.evidence`)."""
        return evidence(self.signature)


def verify_run(run_dir: Path, check_repository: bool = True) -> RunVerification:
    """Verify a run directory: the chain (:func:`audit`), the recipe's hashes, the results bound in
    ``run_end`` and the head signature, and (``check_repository``, else a note says it was not) the
    repository's copy of the log.
    A run file that is not what it should be (nested, huge, a FIFO) is an :class:`AuditError`."""
    source = RunDirEvents(run_dir)
    stored = list(source.stored())
    chain, records = _walk(source, stored)
    verification = RunVerification(chain)
    recipe = recipe_problem(run_dir, records)
    if recipe is not None:
        verification.problems.append(recipe)
    if not chain.ok:
        return verification  # later checks would only repeat the broken chain in other words
    located = [(s.where, r) for s, r in zip(stored, records) if r is not None]
    try:
        summary = read_json(run_dir / "summary.json")
    except RunDirError as exc:
        raise AuditError(exc.problems) from None
    problems, notes, verification.signature = binding_problems(run_dir, located, summary, source.name)
    verification.problems += problems
    verification.notes += notes
    if check_repository:
        problems, notes = repository_problems(run_dir, stored, [r for r in records if r is not None], source.name)
        verification.problems += problems
        verification.notes += notes
    else:  # said, since that copy is what catches a consistent rewrite of an unsigned log
        verification.notes.append("the asset repository's copy of the events was not checked (esper report "
                                  "--verify checks it)")
    return verification
