"""What ``esper compile`` reports: one result per (blueprint, target), the JSON form, the exit code.

The JSON format and the exit codes are documented in ``docs/compile.md``; bump ``REPORT_VERSION``
when a key changes meaning or disappears (adding keys does not need a bump).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from esper_core.compiler.kernels import KernelSpec
from esper_core.errors import Problem

REPORT_VERSION = 1
EXIT_OK = 0
EXIT_FAILED = 1
"""At least one blueprint failed to resolve, validate or store; the others were still compiled."""
EXIT_USAGE = 2
"""Bad input: a command line or recipe (nothing was compiled), a blueprint file that is missing or does
not validate, or under ``--check`` a blueprint with no target of its kind (unless ``--allow-skip``); the
other blueprints were still compiled."""

Status = Literal["compiled", "cached", "checked", "failed"]


def problem_json(problem: Problem) -> dict[str, Any]:
    return {"file": problem.source, "line": problem.line, "field": problem.field, "message": problem.message,
            "text": str(problem)}


@dataclass(frozen=True)
class KernelResult:
    """One blueprint for one target. ``manifest`` is present unless the kernel failed."""

    spec: KernelSpec
    status: Status
    seconds: float
    manifest: dict[str, Any] | None = None
    problems: list[Problem] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        figures = (self.manifest or {}).get("characterisation", {})
        return {
            "target": self.spec.target_json(),
            "target_label": self.spec.label(),
            "address": self.spec.address(),
            "status": self.status,
            "seconds": round(self.seconds, 4),
            "params": figures.get("params"),
            "flops_forward": figures.get("flops_forward"),
            "flops_backward": figures.get("flops_backward"),
            "latency_ms": figures.get("latency_ms"),
            "validation": (self.manifest or {}).get("validation"),
            "problems": [problem_json(p) for p in self.problems],
        }


@dataclass
class BlueprintResult:
    """One blueprint file: its kernels, or the problems that stopped it before any target."""

    file: str
    name: str | None = None
    kernels: list[KernelResult] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    skipped: str | None = None
    loaded: bool = True
    """False when the file is missing or does not validate as a blueprint (invalid input: exit 2)."""

    @property
    def ok(self) -> bool:
        return self.loaded and not self.problems and all(k.status != "failed" for k in self.kernels)

    def all_problems(self) -> list[Problem]:
        """File-level problems and every kernel's, without repeats (in first-seen order)."""
        seen = dict.fromkeys([*self.problems, *(p for k in self.kernels for p in k.problems)])
        return list(seen)

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "name": self.name, "ok": self.ok, "skipped": self.skipped,
                "problems": [problem_json(p) for p in self.all_problems()],
                "kernels": [k.to_json() for k in self.kernels]}


@dataclass
class CompileReport:
    blueprints: list[BlueprintResult]
    check: bool
    store: str | None
    recipe: str | None = None
    allow_skip: bool = False
    """Under ``--check``, whether a blueprint with no target of its kind may pass (it checks nothing)."""

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.blueprints) and not self.unchecked()

    @property
    def exit_code(self) -> int:
        if any(not b.loaded for b in self.blueprints) or self.unchecked():
            return EXIT_USAGE
        return EXIT_OK if self.ok else EXIT_FAILED

    def unchecked(self) -> list[BlueprintResult]:
        """Blueprints that ``--check`` would pass without checking anything (no target of their kind)."""
        return [b for b in self.blueprints if self.check and b.skipped and not self.allow_skip]

    def problems(self) -> list[Problem]:
        skipped = [Problem(b.file, f"{b.skipped}: --check checked nothing for blueprint {b.name!r}; give a target "
                           "of its kind, or --allow-skip") for b in self.unchecked()]
        return [p for b in self.blueprints for p in b.all_problems()] + skipped

    def counts(self) -> dict[str, int]:
        """Kernels per status; a blueprint that did not load counts as one failure (it has no kernels)."""
        statuses = [k.status for b in self.blueprints for k in b.kernels]
        counts = {status: statuses.count(status) for status in ("compiled", "cached", "checked", "failed")}
        counts["failed"] += sum(1 for b in self.blueprints if not b.loaded)
        return counts

    def to_json(self) -> dict[str, Any]:
        unchecked = {id(b) for b in self.unchecked()}  # skipped under --check: what makes the exit 2, not ok
        return {
            "report_version": REPORT_VERSION,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "check": self.check,
            "store": self.store,
            "recipe": self.recipe,
            "torch": torch.__version__,
            "counts": self.counts(),
            "blueprints": [b.to_json() | ({"ok": False} if id(b) in unchecked else {}) for b in self.blueprints],
        }
