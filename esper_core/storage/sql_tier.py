"""The SQL tier: envelopes in the asset repository's ``kernels`` table (SQLite or PostgreSQL).

Writing an envelope is registering the kernel (idempotent), so the catalogue that
``esper inspect-cache`` lists is the same rows the tier serves. Evicting or quarantining clears the
envelope and keeps the row: a kernel's history (created, last used, uses) outlives its bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

from esper_core.compiler.artifact import CorruptKernel
from esper_core.storage.guard import Guard
from esper_core.storage.repository import AssetRepository
from esper_core.storage.tiers import Entry, EnvelopeTier, Outgoing


class SqlTier(EnvelopeTier):
    name = "sql"

    def __init__(self, repository: AssetRepository, guard: Guard, key: bytes | None) -> None:
        super().__init__(key)
        self.repository, self.guard = repository, guard

    def fetch(self, address: str) -> bytes | None:
        return self.repository.envelope(address)

    def save(self, outgoing: Outgoing) -> None:
        """Register the kernel with its envelope. Registration never overwrites a stored envelope, so
        one that is bad is then quarantined (cleared) and replaced: a put repairs the tier."""
        self.repository.register_kernel(outgoing.info, outgoing.envelope)
        try:
            self.load(outgoing.kernel.address)
        except CorruptKernel:
            self.repository.register_kernel(outgoing.info, outgoing.envelope)

    def remove(self, address: str) -> None:
        self.repository.drop_envelope(address)

    def quarantine(self, address: str, blob: bytes, reason: str) -> None:
        self.repository.quarantine(address, self.name, reason, blob, drop_envelope=True)

    def try_lease(self, address: str, holder: str, ttl_s: float) -> bool:
        return self.repository.try_lease(address, holder, ttl_s)

    def release_lease(self, address: str, holder: str) -> None:
        self.repository.release_lease(address, holder)

    def addresses(self) -> list[str]:
        return [record.address for record in self.repository.kernels() if record.stored_bytes]

    def entries(self) -> Iterator[Entry]:
        for record in self.repository.kernels():
            if record.stored_bytes:
                yield Entry(record.address, record.stored_bytes, record.created_at, record.last_used_at)

    def blobs(self) -> Iterator[tuple[str, bytes]]:
        return self.repository.envelopes()

    def close(self) -> None:
        self.repository.close()
