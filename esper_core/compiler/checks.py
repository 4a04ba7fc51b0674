"""The result of one validation step, recorded in the manifest and turned into a located problem."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Check:
    """``field`` is the dotted IR path at fault (``ops.1.init``), so a failure names the line of the
    blueprint file to fix; ``None`` when no single field is to blame."""

    name: str
    passed: bool
    detail: str
    field: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "detail": self.detail}


def failed(checks: list[Check]) -> list[Check]:
    return [check for check in checks if not check.passed]
