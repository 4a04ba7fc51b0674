"""Cross-check a run's event log against the asset repository's copy of it.

The trainer mirrors every event line verbatim into the repository's append-only ``events`` table,
keyed by the run segment's ``run_id`` (one per ``run_start`` / ``run_resume``) and ``seq``. A log
rewritten consistently on disk (every hash recomputed) still differs from that copy, which the
database refuses to update, delete or truncate. So, segment by segment, every line of the log must
be in the repository exactly, and the repository must hold no line the log lacks; except the lines
a killed segment wrote after its last checkpoint, which the resume discarded from the log (they are
after the next segment's first ``seq``, and are reported as a note).

A repository that cannot be reached (no SQLite file, PostgreSQL down) is not an audit failure: the
check says it was not done, and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esper_core.errors import EsperError, Problem
from esper_core.recipe.schema import StorageConfig
from esper_core.recipe.yaml_source import parse_yaml
from esper_core.redact import redacted_url
from esper_core.safe_read import read_regular
from esper_core.telemetry.events import StoredEvent

TIMEOUT_S = 5.0
SEGMENT_STARTS = ("run_start", "run_resume")


def repository_problems(run_dir: Path, stored: list[StoredEvent], records: list[dict[str, Any]],
                        log_name: str) -> tuple[list[Problem], list[str]]:
    """Problems (exit 4) and notes from comparing the verified log with the repository's copy."""
    from esper_core.storage.db import normalise_url
    from esper_core.storage.guard import describe
    from esper_core.storage.repository import AssetRepository

    workspace = next((r.get("workspace") for r in records if r.get("event") == "run_start"), None)
    url, why_not = _repository_url(run_dir, workspace if isinstance(workspace, str) else None)
    if url is None:
        return [], [f"asset repository not checked: {why_not}"]
    shown = redacted_url(normalise_url(url).render_as_string(hide_password=False))
    repository = AssetRepository(url, TIMEOUT_S, migrate=False)
    try:
        return _compare(repository, stored, records, log_name, shown)
    except Exception as exc:  # unreachable, no such tables, refused: the copy cannot be consulted
        return [], [f"asset repository not checked: {shown} could not be read ({describe(exc)})"]
    finally:
        repository.close()


def _compare(repository: Any, stored: list[StoredEvent], records: list[dict[str, Any]], log_name: str,
             shown: str) -> tuple[list[Problem], list[str]]:
    starts = [(i, r.get("run_id")) for i, r in enumerate(records) if r.get("event") in SEGMENT_STARTS]
    problems: list[Problem] = []
    notes: list[str] = []
    checked = 0
    for n, (first, run_id) in enumerate(starts):
        end = starts[n + 1][0] if n + 1 < len(starts) else len(records)
        if not isinstance(run_id, str) or not repository.has_run(run_id):
            notes.append(f"records seq {first}..{end - 1} (run segment {run_id}) were not mirrored into {shown}")
            continue
        copy = {row.seq: row.line for row in repository.events(run_id)}
        for seq in range(first, end):
            line = stored[seq].raw.decode("utf-8", "replace")
            if seq not in copy:
                problems.append(Problem(log_name, f"record seq {seq}: not in the asset repository's copy ({shown}): "
                                        "inserted into the log, or the mirror missed it", line=stored[seq].where))
            elif copy[seq] != line:
                problems.append(Problem(log_name, f"record seq {seq}: differs from the asset repository's copy "
                                        f"({shown}): the log was edited", line=stored[seq].where))
        checked += end - first
        extra = sorted(seq for seq in copy if seq < first or (seq >= end and n + 1 == len(starts)))
        discarded = sorted(seq for seq in copy if seq >= end and n + 1 < len(starts))
        for seq in extra:
            problems.append(Problem(log_name, f"record seq {seq} of run segment {run_id} is in the asset "
                                    f"repository's copy ({shown}) but not in the log: it was deleted"))
        if discarded:
            notes.append(f"{len(discarded)} records of run segment {run_id} (seq {discarded[0]}..{discarded[-1]}) "
                         "were written after its last checkpoint and discarded when the run resumed")
    if not problems:
        notes.append(f"{checked} records match the asset repository's copy ({shown})")
    return problems, notes


def _repository_url(run_dir: Path, workspace: str | None) -> tuple[str | None, str]:
    """The URL of the repository the run mirrored into (its recipe's storage section, with the
    workspace its ``run_start`` recorded, resolved where it was trained; the environment winning as at
    training time), or ``None`` and why it cannot be consulted."""
    from esper_core.storage.db import normalise_url
    from esper_core.storage.settings import StorageSettings

    try:
        document = parse_yaml(read_regular(run_dir / "recipe.yaml", 1 << 20).decode("utf-8"), "recipe.yaml")
        section = document.data.get("storage") if isinstance(document.data, dict) else None
        section = {**(section if isinstance(section, dict) else {}), **({"workspace": workspace} if workspace else {})}
        url = StorageSettings.resolve(StorageConfig.model_validate(section)).database_url
        parsed = normalise_url(url)
    except (OSError, ValueError, EsperError) as exc:
        return None, f"the run's storage settings cannot be read ({exc})"
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        return None, f"no SQLite repository at {parsed.database} (the run's storage.workspace)"
    return url, ""
