"""Read a run directory into plain data for the report: recipe, summary, metrics, events, checkpoints.

Reading never trusts the files to be well formed: the event log may have been edited (that is what
the audit is for), and a crashed run leaves no summary and possibly a torn last metrics line. Such
damage is reported in the report's warnings; only a path that is not a run directory at all, or a
file that cannot be parsed where the report needs it, is an error (exit 2).

The factory code a run recorded (``recipe_code``, :mod:`esper_core.training.factory_sources`) is read
from ``final/manifest.json``, which ``run_end`` binds, or, for a run that has not finished, from its
latest checkpoint's ``state.json``, which nothing in the event chain binds: the report says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper_core.errors import CheckpointError, ConfigError, Problem
from esper_core.recipe.yaml_source import MAX_FILE_BYTES, parse_yaml
from esper_core.safe_read import UnsafeInput, parse_json, read_regular
from esper_core.telemetry.audit import AuditResult, verify_run
from esper_core.telemetry.binding import Signature
from esper_core.telemetry.events import MAX_LINE_BYTES, RunDirError, RunDirEvents, read_json
from esper_core.training.factory_sources import ModuleSource, read_sources

MAX_METRICS_BYTES = 1 << 30

Record = dict[str, Any]


@dataclass(frozen=True)
class RecordedCode:
    """The factory code a run recorded, and the record it was read from."""

    where: str
    """The record, relative to the run directory (``final/manifest.json``, ``checkpoints/step-N/state.json``)."""
    bound: bool
    """Whether the event chain binds that record (``run_end`` binds ``final/manifest.json``)."""
    sources: dict[str, ModuleSource] | None
    """Each module's recorded file and sha256; ``None`` when the record holds none to read (see ``missing``)."""
    recipe_dir: Path | None
    """The directory of the recipe the run was trained from: files inside it are shown relative to it."""
    missing: str | None = None
    """Why ``sources`` is ``None``, completing a sentence about ``where``: the run predates the record, or
    the record cannot be read."""


@dataclass
class RunFiles:
    """Everything a report is made from, as read from one run directory."""

    run_dir: Path
    audit: AuditResult
    events: list[Record]
    metrics: list[Record]
    recipe: dict[str, Any]
    recipe_sha256: str | None
    integrity: list[Problem]
    """Problems besides the chain's: the recipe's hashes, the results bound in run_end, the signature."""
    summary: dict[str, Any] | None
    checkpoints: list[Record]
    warnings: list[str] = field(default_factory=list)
    code: RecordedCode | None = None
    """The factory code the run recorded; ``None`` when it has neither ``final/`` nor a checkpoint."""
    signature: Signature | None = None
    """The head signature's state (:data:`esper_core.telemetry.binding.Signature`): what the log proves."""
    tamper_evident: bool = False
    """:attr:`esper_core.telemetry.audit.RunVerification.tamper_evident`."""


def load_run(run_dir: Path) -> RunFiles:
    source = RunDirEvents(run_dir)  # raises RunDirError for a path that is not a run directory
    verification = verify_run(run_dir, check_repository=False)
    warnings: list[str] = list(verification.notes)
    events: list[Record] = []
    for stored in source.stored():
        record = stored.parse()
        if record is None:
            warnings.append(f"{source.name}:{stored.where}: not a JSON object; left out of the report")
        elif not _is_int(record.get("step")):
            warnings.append(f"{source.name}:{stored.where}: its step is not an integer; left out of the report")
        else:
            events.append(record | {"_line": stored.where})
    recipe = _read_recipe(run_dir / "recipe.yaml", warnings)
    try:
        recipe_sha256 = read_regular(run_dir / "recipe.sha256", 1024).decode("ascii").strip()
    except (OSError, ValueError):
        recipe_sha256 = None  # the audit says what is wrong with it
    summary = read_json(run_dir / "summary.json")
    if summary is not None and "steps" in summary and not _is_int(summary["steps"]):
        warnings.append(f"{run_dir / 'summary.json'}: steps is not an integer; ignored")
        summary = {k: v for k, v in summary.items() if k != "steps"}
    checkpoints = _list_checkpoints(run_dir / "checkpoints")
    return RunFiles(run_dir, verification.chain, events, _read_metrics(run_dir / "metrics.jsonl", warnings), recipe,
                    recipe_sha256, verification.problems, summary, checkpoints, warnings,
                    _read_code(run_dir, checkpoints), verification.signature, verification.tamper_evident)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_recipe(path: Path, warnings: list[str]) -> dict[str, Any]:
    """The recipe as a mapping, or ``{}`` with a warning: a damaged recipe fails the audit (its hash)
    and the report is still written, saying so."""
    try:
        document = parse_yaml(read_regular(path, MAX_FILE_BYTES).decode("utf-8"), str(path))
    except FileNotFoundError:
        warnings.append(f"{path}: missing; the recipe cannot be shown")
        return {}
    except (UnsafeInput, UnicodeDecodeError, ConfigError) as exc:
        warnings.append(f"{path}: unreadable ({exc}); the recipe cannot be shown")
        return {}
    if not isinstance(document.data, dict):
        warnings.append(f"{path}: not a mapping of recipe sections; the recipe cannot be shown")
        return {}
    return document.data


def _read_metrics(path: Path, warnings: list[str]) -> list[Record]:
    """metrics.jsonl rows; a line that does not parse (a crash mid-write) is skipped with a warning."""
    try:
        data = read_regular(path, MAX_METRICS_BYTES)
    except FileNotFoundError:
        warnings.append(f"{path}: missing; no curves can be drawn")
        return []
    except UnsafeInput as exc:
        warnings.append(f"{path}: {exc}; no curves can be drawn")
        return []
    rows = []
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            row = parse_json(line, MAX_LINE_BYTES)
        except ValueError as exc:
            warnings.append(f"{path}:{number}: not valid JSON ({str(exc)[:80]}); skipped")
            continue
        if isinstance(row, dict) and _is_int(row.get("step")):
            rows.append(row)
        else:
            warnings.append(f"{path}:{number}: not a metrics row; skipped")
    return rows


def _list_checkpoints(directory: Path) -> list[Record]:
    """Committed checkpoints (``step-*`` directories), oldest first, with what their manifests say."""
    if not directory.is_dir():
        return []
    try:
        latest = read_regular(directory / "LATEST", 64).decode("ascii", "replace").strip()
    except (OSError, UnsafeInput):  # missing or damaged: no checkpoint is marked latest
        latest = None
    listed = []
    for path in sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step-")):
        try:
            manifest = read_json(path / "manifest.json") or {}
        except RunDirError:
            manifest = {}
        files = manifest.get("files")
        files = files if isinstance(files, dict) else {}
        listed.append({"name": path.name, "step": manifest.get("step"), "latest": path.name == latest,
                       "bytes": sum(f["bytes"] for f in files.values()
                                    if isinstance(f, dict) and isinstance(f.get("bytes"), int)),
                       "complete": bool(manifest), "val_loss": manifest.get("val_loss")})
    return listed


def _read_code(run_dir: Path, checkpoints: list[Record]) -> RecordedCode | None:
    """The factory code recorded in ``final/manifest.json`` or, before the run finished, in its latest
    checkpoint's ``state.json`` (``checkpoints`` as :func:`_list_checkpoints` lists them)."""
    latest = next((c["name"] for c in reversed(checkpoints) if c["latest"]), None)
    candidates = [("final/manifest.json", True)] + ([(f"checkpoints/{latest}/state.json", False)] if latest else [])
    for where, bound in candidates:
        try:
            record = read_json(run_dir / where)
        except RunDirError as exc:  # damaged or replaced: the audit, or the checkpoint's own manifest, says more
            return RecordedCode(where, bound, None, None, f"cannot be read ({exc.problems[0].message})")
        if record is None:
            continue
        recipe_dir = record.get("recipe_dir")
        base_dir = Path(recipe_dir) if isinstance(recipe_dir, str) else None
        if "recipe_code" not in record:
            return RecordedCode(where, bound, None, base_dir, "records no factory code (the run predates that record)")
        try:
            return RecordedCode(where, bound, read_sources(record["recipe_code"], where), base_dir)
        except CheckpointError as exc:
            return RecordedCode(where, bound, None, base_dir, f"cannot be read ({exc.problems[0].message})")
    return None
