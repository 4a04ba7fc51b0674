"""The Redis tier: envelopes shared by every machine that can reach the server.

Keys: ``<ns>:kernel:<address>`` (an envelope), ``<ns>:lease:<address>`` (who compiles it now, with a
TTL), ``<ns>:quarantine:<address>`` (a bad entry, kept a day for inspection). Entries carry no TTL:
bound Redis with ``maxmemory`` and an LRU policy; a key Redis evicts is a miss served from below.

The client waits at most the tier's deadline per socket operation and never retries by itself: a
retry is the guard's and the breaker's decision, not the library's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from esper_core.compiler.artifact import is_address
from esper_core.storage.guard import Guard
from esper_core.storage.tiers import Entry, EnvelopeTier, Outgoing

QUARANTINE_TTL_S = 86_400
# Move the entry aside only if it still holds the bad bytes: a concurrent repair must not be undone.
_QUARANTINE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
  redis.call('DEL', KEYS[1])
end
"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end"


class RedisTier(EnvelopeTier):
    name = "redis"

    def __init__(self, url: str, guard: Guard, key: bytes | None, namespace: str = "esper") -> None:
        import redis  # only paid when a Redis URL is configured
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        super().__init__(key)
        self.guard, self.namespace = guard, namespace
        timeout = guard.deadline_s
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                           retry=Retry(NoBackoff(), 0), client_name="esper-kernel-cache")
        self._quarantine = self.client.register_script(_QUARANTINE)
        self._release = self.client.register_script(_RELEASE)

    def _key_of(self, kind: str, address: str) -> str:
        return f"{self.namespace}:{kind}:{address}"

    def fetch(self, address: str) -> bytes | None:
        return self.client.get(self._key_of("kernel", address))  # type: ignore[return-value]

    def save(self, outgoing: Outgoing) -> None:
        self.client.set(self._key_of("kernel", outgoing.kernel.address), outgoing.envelope)

    def remove(self, address: str) -> None:
        self.client.delete(self._key_of("kernel", address))

    def quarantine(self, address: str, blob: bytes, reason: str) -> None:
        self._quarantine(keys=[self._key_of("kernel", address), self._key_of("quarantine", address)],
                         args=[blob, QUARANTINE_TTL_S])

    def try_lease(self, address: str, holder: str, ttl_s: float) -> bool:
        return bool(self.client.set(self._key_of("lease", address), holder, nx=True, px=max(1, int(ttl_s * 1000))))

    def release_lease(self, address: str, holder: str) -> None:
        self._release(keys=[self._key_of("lease", address)], args=[holder])

    def addresses(self) -> list[str]:
        prefix = self._key_of("kernel", "")
        # anyone can write a key here: one that is not UTF-8 is not an address, and must not fail the listing
        names = (key.decode("utf-8", "replace")[len(prefix):]
                 for key in self.client.scan_iter(match=prefix + "*", count=1000))
        return [name for name in names if is_address(name)]

    def entries(self) -> Iterator[Entry]:
        """Entries with their size and idle time (Redis keeps no creation time)."""
        addresses = self.addresses()
        pipe = self.client.pipeline(transaction=False)
        for address in addresses:
            pipe.strlen(self._key_of("kernel", address))
            pipe.object("idletime", self._key_of("kernel", address))
        replies = pipe.execute(raise_on_error=False)  # a key of another type is not an entry, not an outage
        now = time.time()
        for address, size, idle in zip(addresses, replies[::2], replies[1::2], strict=True):
            if isinstance(size, int) and size and not isinstance(idle, Exception):
                yield Entry(address, int(size), None, None if idle is None else now - int(idle))

    def blobs(self) -> Iterator[tuple[str, bytes | None]]:
        """Each stored envelope; ``None`` for a key of another type at a kernel's address (which
        ``verify`` reports as a bad entry, where reading it failed the whole tier)."""
        from redis.exceptions import ResponseError

        for address in self.addresses():
            try:
                blob = self.fetch(address)
            except ResponseError:  # WRONGTYPE
                yield address, None
                continue
            if blob is not None:
                yield address, blob

    def close(self) -> None:
        self.client.close()
