"""Plain records the asset repository takes and returns (no SQLAlchemy, no torch: cheap to import
for the cache's hot path and for worker processes)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class KernelInfo:
    """What the repository records about a kernel (plain data: built by the caller from a manifest)."""

    address: str
    blueprint: str
    blueprint_version: int
    blueprint_digest: str
    target: str
    torch: str
    size_bytes: int


@dataclass(frozen=True)
class KernelRecord:
    address: str
    blueprint: str
    target: str
    torch: str
    size_bytes: int
    stored_bytes: int
    created_at: float
    last_used_at: float | None
    uses: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EventRecord:
    run_id: str
    seq: int
    kind: str
    line: str
    sha256: str


@dataclass(frozen=True)
class TierCount:
    hits: int = 0
    misses: int = 0
    integrity_failures: int = 0
