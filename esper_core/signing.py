"""HMAC-SHA256 signatures with ``ESPER_SIGNING_KEY``: the one keyed digest every signer uses.

Kernel envelopes in the shared cache tiers and the head of a run's event chain are signed with it.
Each use prefixes its own domain tag, so a signature made for one can never pass for the other.
"""

from __future__ import annotations

import hashlib
import hmac


def keyed_digest(key: bytes, *parts: bytes | memoryview) -> bytes:
    """HMAC-SHA256 of the concatenation of ``parts`` under ``key``."""
    signer = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        signer.update(part)
    return signer.digest()


def same(a: bytes | str, b: bytes | str) -> bool:
    """Constant-time comparison of two signatures (a timing side channel would leak the right one)."""
    return hmac.compare_digest(a, b)
