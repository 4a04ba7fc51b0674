"""Read a run directory into plain data for the report: recipe, summary, metrics, events, checkpoints.

Reading never trusts the files to be well formed: the event log may have been edited (that is what
the audit is for), and a crashed run leaves no summary and possibly a torn last metrics line. Such
damage is reported in the report's warnings; only a path that is not a run directory at all, or a
file that cannot be parsed where the report needs it, is an error (exit 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from esper_core.errors import Problem
from esper_core.telemetry.audit import AuditResult, audit, recipe_problem
from esper_core.telemetry.events import RunDirError, RunDirEvents, read_json

Record = dict[str, Any]


@dataclass
class RunFiles:
    """Everything a report is made from, as read from one run directory."""

    run_dir: Path
    audit: AuditResult
    events: list[Record]
    metrics: list[Record]
    recipe: dict[str, Any]
    recipe_sha256: str | None
    recipe_problem: Problem | None
    summary: dict[str, Any] | None
    checkpoints: list[Record]
    warnings: list[str] = field(default_factory=list)


def load_run(run_dir: Path) -> RunFiles:
    source = RunDirEvents(run_dir)  # raises RunDirError for a path that is not a run directory
    result = audit(source)
    warnings: list[str] = []
    events: list[Record] = []
    for stored in source.stored():
        record = stored.parse()
        if record is None:
            warnings.append(f"{source.name}:{stored.where}: not a JSON object; left out of the report")
        else:
            events.append(record | {"_line": stored.where})
    recipe_path = run_dir / "recipe.yaml"
    if not recipe_path.is_file():
        raise RunDirError(Problem(str(run_dir), "not a run directory: it has no recipe.yaml"))
    recipe = _read_recipe(recipe_path, recipe_path.read_bytes())
    hash_path = run_dir / "recipe.sha256"
    recipe_sha256 = hash_path.read_text(encoding="utf-8").strip() if hash_path.is_file() else None
    return RunFiles(run_dir, result, events, _read_metrics(run_dir / "metrics.jsonl", warnings), recipe,
                    recipe_sha256, recipe_problem(run_dir), read_json(run_dir / "summary.json"),
                    _list_checkpoints(run_dir / "checkpoints"), warnings)


def _read_recipe(path: Path, data: bytes) -> dict[str, Any]:
    try:
        recipe = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RunDirError(Problem(str(path), f"not UTF-8 text ({exc.reason})")) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise RunDirError(Problem(str(path), f"not valid YAML: {getattr(exc, 'problem', None) or exc}",
                                  line=mark.line + 1 if mark else None)) from None
    if not isinstance(recipe, dict):
        raise RunDirError(Problem(str(path), "expected a mapping of recipe sections"))
    return recipe


def _read_metrics(path: Path, warnings: list[str]) -> list[Record]:
    """metrics.jsonl rows; a line that does not parse (a crash mid-write) is skipped with a warning."""
    if not path.is_file():
        warnings.append(f"{path}: missing; no curves can be drawn")
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            warnings.append(f"{path}:{number}: not valid JSON; skipped")
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            warnings.append(f"{path}:{number}: not a metrics row; skipped")
    return rows


def _list_checkpoints(directory: Path) -> list[Record]:
    """Committed checkpoints (``step-*`` directories), oldest first, with what their manifests say."""
    if not directory.is_dir():
        return []
    latest_path = directory / "LATEST"
    latest = latest_path.read_text(encoding="utf-8").strip() if latest_path.is_file() else None
    listed = []
    for path in sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step-")):
        try:
            manifest = read_json(path / "manifest.json") or {}
        except RunDirError:
            manifest = {}
        files = manifest.get("files")
        files = files if isinstance(files, dict) else {}
        listed.append({"name": path.name, "step": manifest.get("step"), "latest": path.name == latest,
                       "bytes": sum(f.get("bytes", 0) for f in files.values() if isinstance(f, dict)),
                       "complete": bool(manifest), "val_loss": manifest.get("val_loss")})
    return listed
