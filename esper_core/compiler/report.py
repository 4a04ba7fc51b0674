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
"""At least one blueprint failed to load, resolve, validate or store; the others were still compiled."""
EXIT_USAGE = 2
"""Bad command line or recipe: nothing was compiled."""

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

    @property
    def ok(self) -> bool:
        return not self.problems and all(k.status != "failed" for k in self.kernels)

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

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.blueprints)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_FAILED

    def problems(self) -> list[Problem]:
        return [p for b in self.blueprints for p in b.all_problems()]

    def counts(self) -> dict[str, int]:
        statuses = [k.status for b in self.blueprints for k in b.kernels]
        return {status: statuses.count(status) for status in ("compiled", "cached", "checked", "failed")}

    def to_json(self) -> dict[str, Any]:
        return {
            "report_version": REPORT_VERSION,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "check": self.check,
            "store": self.store,
            "recipe": self.recipe,
            "torch": torch.__version__,
            "counts": self.counts(),
            "blueprints": [b.to_json() for b in self.blueprints],
        }
