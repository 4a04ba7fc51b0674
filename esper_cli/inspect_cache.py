"""`esper inspect-cache [--workspace DIR] [--verify] [--prune --older-than DAYS | --max-bytes N] [--json]`.

Tiers come from the workspace and the environment (``ESPER_REDIS_URL``, ``ESPER_DATABASE_URL``,
``ESPER_SIGNING_KEY``), as for a run. Exit 0, or 4 when ``--verify`` finds corrupt entries, 2 for
bad options (a ``--workspace`` that is missing or not a directory included); a tier that is down is
reported, not an error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from esper_cli.console import Col, fitted_table, make_console
from esper_cli.errors import reported
from esper_core.errors import ConfigError, Problem
from esper_core.recipe.schema import StorageConfig

if TYPE_CHECKING:  # imported when the command runs: it pulls in torch, which --help should not pay for
    from esper_core.storage.inspection import CacheReport

SHOWN_ENTRIES = 50


@reported
def inspect_cache(
    workspace: Path = typer.Option(None, "--workspace", help="Storage workspace, as the recipe's "
                                   "storage.workspace (default .esper).", show_default=False),
    verify: bool = typer.Option(False, "--verify", help="Re-hash every entry of every reachable tier; exit 4 "
                                "if any is corrupt."),
    prune: bool = typer.Option(False, "--prune", help="Evict entries (with --older-than and/or --max-bytes)."),
    older_than: float = typer.Option(None, "--older-than", min=0.0, help="With --prune: evict entries not used "
                                     "for this many days.", show_default=False),
    max_bytes: int = typer.Option(None, "--max-bytes", min=0, help="With --prune: evict least recently used "
                                  "entries until each tier holds at most N bytes.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the machine-readable report on stdout."),
) -> None:
    """Show the kernel cache tiers and their entries; verify or prune them."""
    from esper_core.storage.inspection import CorruptEntries
    from esper_core.storage.inspection import inspect_cache as run_inspection
    from esper_core.storage.settings import StorageSettings

    if prune and older_than is None and max_bytes is None:
        raise ConfigError(Problem("command line", "--prune needs --older-than DAYS or --max-bytes N",
                                  field="--prune"))
    if not prune and (older_than is not None or max_bytes is not None):
        raise ConfigError(Problem("command line", "--older-than and --max-bytes only apply with --prune",
                                  field="--older-than" if older_than is not None else "--max-bytes"))
    cfg = StorageConfig() if workspace is None else StorageConfig(workspace=str(workspace))
    _check_workspace(Path(cfg.workspace), named=workspace is not None)
    settings = StorageSettings.resolve(cfg)
    try:
        report = run_inspection(settings, verify=verify, older_than_days=older_than, max_bytes=max_bytes)
    except CorruptEntries as exc:
        _show(exc.report, as_json)  # type: ignore[attr-defined]
        raise
    _show(report, as_json)


def _check_workspace(path: Path, named: bool) -> None:
    """A workspace that is a file, or one named on the command line that does not exist (a typo), would
    be shown as an empty cache whose entries are all intact: exit 2 instead. A default workspace that a
    project has not created yet is fine (its remote tiers are still worth showing)."""
    if path.is_dir() or not (named or path.exists()):
        return
    what = "no such directory" if not path.exists() else "not a directory (a regular file)" if path.is_file() \
        else "not a directory"
    raise ConfigError(Problem("command line", f"{path}: {what}; name a storage workspace directory (a recipe's "
                              "storage.workspace)", field="--workspace"))


def _show(report: CacheReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    console = make_console()
    console.print(f"Kernel cache of workspace {report.workspace}", soft_wrap=True, markup=False, highlight=False)
    tiers, kept = _tier_table(report, console.width)
    console.print(tiers)
    if WHERE not in kept:  # too narrow for the locations: one line per tier, never cut
        for tier in report.tiers:
            console.print(f"  {tier.name}: {tier.where}", soft_wrap=True, markup=False, highlight=False)
    console.print(_entry_table(report, console.width))
    if report.pruned is not None:
        freed = sum(size for _, _, size in report.pruned)
        console.print(f"pruned {len(report.pruned)} entries ({_size(freed)})")
    if report.corrupt is not None:
        checked = ", ".join(t.name for t in report.tiers if t.reachable)
        skipped = ", ".join(f"{t.name} ({t.error or 'unreachable'})" for t in report.tiers if not t.reachable)
        found = f"{len(report.corrupt)} corrupt" if report.corrupt else "all entries intact"
        unverified = f"; not verified: {skipped}" if skipped else ""
        console.print(f"verified: {found} in {checked or 'no tier'}{unverified}", soft_wrap=True)


WHERE = 7
"""Index of the ``where`` column in the tier table (the first to go on a narrow terminal)."""


def _tier_table(report: CacheReport, width: int) -> tuple[Table, list[int]]:
    columns = [Col("tier"), Col("status", style=_status_style), Col("entries", "right"), Col("bytes", "right"),
               Col("hit rate", "right", optional=True), Col("hits", "right", optional=True),
               Col("misses", "right", optional=True), Col("where", optional=True)]
    rows = []
    for tier in report.tiers:
        status = "reachable" if tier.reachable and not tier.error else tier.error if tier.reachable else \
            f"unreachable: {tier.error}"
        rate = tier.hit_rate
        rows.append([tier.name, status or "-", _dash(tier.entries), _size(tier.bytes),
                     "-" if rate is None else f"{rate:.1%}", _dash(tier.hits), _dash(tier.misses), tier.where])
    return fitted_table("Kernel cache tiers", columns, rows, width)


def _status_style(status: str) -> str:
    return "green" if status == "reachable" else "red" if status.startswith("unreachable") else "yellow"


def _entry_table(report: CacheReport, width: int) -> Table:
    entries = report.entries
    shown = entries[:SHOWN_ENTRIES]
    columns = [Col("address"), Col("blueprint"), Col("target"), Col("size", "right"), Col("uses", "right"),
               Col("tiers", optional=True), Col("last used", optional=True), Col("created", optional=True)]
    rows = [[entry.address[:12], entry.blueprint or "-", entry.target or "-", _size(entry.bytes), _dash(entry.uses),
             ",".join(entry.tiers), _when(entry.last_used), _when(entry.created)] for entry in shown]
    more = f"{len(entries) - len(shown)} more; --json lists all" if len(entries) > len(shown) else None
    table, _ = fitted_table(f"Entries ({len(entries)}{', most recently used first' if entries else ''})", columns,
                            rows, width, caption=more)
    return table


def _dash(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    if value < 1024:
        return f"{value:,} B"
    scaled = float(value)
    for unit in ("KiB", "MiB", "GiB"):
        scaled /= 1024
        if scaled < 1024 or unit == "GiB":
            break
    return f"{scaled:.1f} {unit}"


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))
