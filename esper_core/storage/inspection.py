"""What ``esper inspect-cache`` reports and does: per-tier figures, the entries, verification, pruning.

Read-only unless pruning: verification reports bad entries without moving them (the next lookup
quarantines them), and a workspace without a database is reported, not created. Memory is per
process, so its row shows the hits and misses that caches flushed to the repository, no entries.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esper_core.compiler.artifact import MANIFEST, MAX_MANIFEST_BYTES
from esper_core.compiler.kernels import KernelSpec
from esper_core.compiler.store import default_store_root
from esper_core.errors import EsperError, Problem
from esper_core.redact import redacted_url
from esper_core.safe_read import parse_json, read_regular
from esper_core.storage.cache import build_tiers
from esper_core.storage.guard import TierUnavailable
from esper_core.storage.records import KernelRecord, TierCount
from esper_core.storage.settings import StorageSettings, sqlite_url
from esper_core.storage.tiers import Entry, Tier

DAY_S = 86_400.0
TIER_ORDER = ("memory", "redis", "sql", "disk")


class CorruptEntries(EsperError):
    """``--verify`` found entries that fail verification."""

    exit_code = 4


@dataclass
class TierReport:
    name: str
    where: str
    reachable: bool
    error: str | None = None
    entries: int | None = None
    bytes: int | None = None
    hits: int | None = None
    misses: int | None = None

    @property
    def hit_rate(self) -> float | None:
        looked = (self.hits or 0) + (self.misses or 0)
        return None if self.hits is None or not looked else self.hits / looked

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "hit_rate": self.hit_rate}


@dataclass
class EntryReport:
    address: str
    blueprint: str | None
    target: str | None
    bytes: int
    created: float | None
    last_used: float | None
    uses: int | None
    tiers: list[str] = field(default_factory=list)


@dataclass
class CacheReport:
    workspace: str
    tiers: list[TierReport]
    entries: list[EntryReport]
    corrupt: list[tuple[str, str, str]] | None = None
    """(tier, address, reason), with ``--verify``."""
    pruned: list[tuple[str, str, int]] | None = None
    """(tier, address, bytes), with ``--prune``."""

    def to_json(self) -> dict[str, Any]:
        return {"workspace": self.workspace, "tiers": [t.to_json() for t in self.tiers],
                "entries": [asdict(e) for e in self.entries],
                "corrupt": None if self.corrupt is None else [dict(zip(("tier", "address", "reason"), c, strict=True))
                                                              for c in self.corrupt],
                "pruned": None if self.pruned is None else [dict(zip(("tier", "address", "bytes"), p, strict=True))
                                                            for p in self.pruned]}


def inspect_cache(settings: StorageSettings, *, verify: bool = False, older_than_days: float | None = None,
                  max_bytes: int | None = None) -> CacheReport:
    """Report every tier; prune by age and/or size first if asked (``max_bytes`` applies per tier,
    least recently used first). Raises :class:`CorruptEntries` after building the report when
    ``verify`` found bad entries; the report is then on the exception as ``report``."""
    tiers = _tiers(settings)
    try:
        pruned = None
        if older_than_days is not None or max_bytes is not None:
            pruned = _prune(tiers, _catalogue(tiers)[1], older_than_days, max_bytes)
        report = _report(settings, tiers)
        report.pruned = pruned
        if verify:
            report.corrupt = _verify(tiers, report.tiers)
    finally:
        for tier in tiers:
            tier.guard.close()
            tier.close()
    if report.corrupt:
        error = CorruptEntries([Problem(f"{tier} tier", f"kernel {address}: {reason}")
                                for tier, address, reason in report.corrupt])
        error.report = report  # type: ignore[attr-defined]
        raise error
    return report


def _tiers(settings: StorageSettings) -> list[Tier]:
    """The configured tiers, less a default SQLite database that does not exist yet (not created here)."""
    tiers = build_tiers(settings)
    database = Path(sqlite_url(settings.workspace).removeprefix("sqlite:///"))
    if settings.database_url == sqlite_url(settings.workspace) and not database.is_file():
        tiers = [tier for tier in tiers if tier.name != "sql"]
    return tiers


def _entries(tier: Tier) -> list[Entry]:
    return tier.guard.call(lambda: list(tier.entries()))


def _catalogue(tiers: list[Tier]) -> tuple[dict[str, TierCount] | None, dict[str, KernelRecord]]:
    """Persisted per-tier counters (None when the repository cannot be asked) and kernel records."""
    sql = next((tier for tier in tiers if tier.name == "sql"), None)
    if sql is None:
        return None, {}
    try:
        counters = sql.guard.call(sql.repository.counters)  # type: ignore[attr-defined]
        records = sql.guard.call(sql.repository.kernels)  # type: ignore[attr-defined]
    except TierUnavailable:
        return None, {}
    return counters, {record.address: record for record in records}


def _report(settings: StorageSettings, tiers: list[Tier]) -> CacheReport:
    counters, records = _catalogue(tiers)
    sql = next((tier for tier in tiers if tier.name == "sql"), None)

    def counted(name: str) -> tuple[int | None, int | None]:
        if counters is None:
            return None, None
        count = counters.get(name, TierCount())
        return count.hits, count.misses

    reports = [TierReport("memory", "per process", True, None, None, None, *counted("memory"))]
    entries: dict[str, EntryReport] = {}
    for tier in tiers:
        where = _where(settings, tier.name)
        try:
            found = _entries(tier)
        except TierUnavailable as exc:
            reports.append(TierReport(tier.name, where, False, str(exc).split(": ", 1)[-1]))
            continue
        reports.append(TierReport(tier.name, where, True, None, len(found), sum(e.bytes for e in found),
                                  *counted(tier.name)))
        for entry in found:
            _merge(entries, tier, entry, records.get(entry.address))
    if sql is None:
        reports.append(TierReport("sql", _where(settings, "sql"), True, "no database yet", 0, 0))
    reports.sort(key=lambda report: TIER_ORDER.index(report.name))
    ordered = sorted(entries.values(), key=lambda e: (e.last_used or e.created or 0.0), reverse=True)
    return CacheReport(str(settings.workspace), reports, ordered)


def _merge(entries: dict[str, EntryReport], tier: Tier, entry: Entry, record: KernelRecord | None) -> None:
    report = entries.get(entry.address)
    if report is None:
        blueprint, target = (record.blueprint, record.target) if record else _describe_from_disk(tier, entry.address)
        report = entries[entry.address] = EntryReport(
            entry.address, blueprint, target, record.size_bytes if record else entry.bytes,
            record.created_at if record else entry.created, None, record.uses if record else None)
    report.tiers.append(tier.name)
    used = [t for t in (report.last_used, entry.last_used, record and record.last_used_at) if t]
    report.last_used = max(used) if used else None
    if report.created is None:
        report.created = entry.created


def _describe_from_disk(tier: Tier, address: str) -> tuple[str | None, str | None]:
    """Blueprint and target of an entry the repository does not know (e.g. written by an older
    ``esper compile``), from its manifest; unverified, for display only."""
    if tier.name != "disk":
        return None, None
    try:
        path = tier.store.path_for(address) / MANIFEST  # type: ignore[attr-defined]
        manifest = parse_json(read_regular(path, MAX_MANIFEST_BYTES), MAX_MANIFEST_BYTES)  # no FIFO, no deep nesting
        return manifest["blueprint"]["name"], KernelSpec.from_json(manifest).label()
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def _verify(tiers: list[Tier], reports: list[TierReport]) -> list[tuple[str, str, str]]:
    reachable = {report.name for report in reports if report.reachable}
    corrupt: list[tuple[str, str, str]] = []
    for tier in tiers:
        if tier.name in reachable:
            try:
                corrupt.extend((tier.name, address, reason)
                               for address, reason in tier.guard.call(lambda t=tier: list(t.verify())))
            except TierUnavailable as exc:
                corrupt.append((tier.name, "-", f"could not be verified: {exc}"))
    return corrupt


def _prune(tiers: list[Tier], records: dict[str, KernelRecord], older_than_days: float | None,
           max_bytes: int | None) -> list[tuple[str, str, int]]:
    """Evict per tier, least recently used first. "Used" is the later of what the tier knows and
    what the repository recorded: a kernel served from an upper tier is in use everywhere."""
    pruned = []
    cutoff = None if older_than_days is None else time.time() - older_than_days * DAY_S

    def used(entry: Entry) -> float:
        record = records.get(entry.address)
        return max(entry.last_used or 0.0, entry.created or 0.0, (record and record.last_used_at) or 0.0)

    for tier in tiers:
        try:
            found = sorted(_entries(tier), key=used)
        except TierUnavailable:
            continue
        total = sum(entry.bytes for entry in found)
        for entry in found:
            if (cutoff is not None and used(entry) < cutoff) or (max_bytes is not None and total > max_bytes):
                try:
                    tier.guard.call(tier.remove, entry.address)
                except TierUnavailable:
                    break
                total -= entry.bytes
                pruned.append((tier.name, entry.address, entry.bytes))
    return pruned


def _where(settings: StorageSettings, tier: str) -> str:
    if tier == "redis":
        return redacted_url(settings.redis_url or "")
    if tier == "sql":
        return redacted_url(settings.database_url)
    return str(default_store_root(settings.workspace))


