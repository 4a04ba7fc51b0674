"""Envelopes: how a kernel travels through the shared tiers (Redis, the database).

A shared tier is written by other machines and other programs, so its bytes are untrusted. An
envelope is checked *before* anything in it is parsed::

    MAGIC (6) | FLAGS (1) | SHA256 (32) | HMAC-SHA256 (32) | BODY

``SHA256`` is the digest of ``address || BODY`` and ``HMAC`` the keyed digest of ``MAGIC || FLAGS ||
address || BODY`` (zeros when unsigned). Binding the address means a valid entry copied under
another key is still rejected. With a signing key configured, an unsigned or wrongly signed envelope
is rejected: only holders of the key can put kernels into the shared tiers.

``BODY`` is the kernel's files in :data:`~esper_core.compiler.artifact.FILES` order, each as a 4-byte
big-endian length and the bytes: no names, no nesting, nothing a parser could be tricked by, and no
pickle. The files are then verified again by :meth:`Kernel.from_files` (manifest digest, file
digests, address), so an envelope holds a kernel exactly as the compiler wrote it.
"""

from __future__ import annotations

import hashlib
import struct

from esper_core.compiler.artifact import FILES, CorruptKernel, Kernel
from esper_core.signing import keyed_digest, same

MAGIC = b"ESPKE1"
SIGNED = 0x01
_HEADER = struct.Struct(">6sB32s32s")
_LENGTH = struct.Struct(">I")
_NO_MAC = bytes(32)


def seal(kernel: Kernel, key: bytes | None) -> bytes:
    """The envelope of ``kernel``, signed when ``key`` is given."""
    body = b"".join(_LENGTH.pack(len(kernel.files[name])) + kernel.files[name] for name in FILES)
    flags = SIGNED if key else 0
    digest = hashlib.sha256(kernel.address.encode() + body).digest()
    mac = _mac(key, flags, kernel.address, body) if key else _NO_MAC
    return _HEADER.pack(MAGIC, flags, digest, mac) + body


def open_envelope(blob: bytes, address: str, key: bytes | None) -> Kernel:
    """Verify ``blob`` as the envelope of ``address`` and return its kernel.

    Raises :class:`CorruptKernel` for anything else: random bytes, a pickle, a truncated or edited
    entry, an entry of another address, or (with ``key``) an unsigned or wrongly signed one.
    """
    if len(blob) < _HEADER.size:
        raise CorruptKernel(f"{len(blob)} bytes: too short for an envelope")
    magic, flags, digest, mac = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptKernel("not a kernel envelope (bad magic)")
    body = memoryview(blob)[_HEADER.size:]
    if not same(hashlib.sha256(address.encode() + body).digest(), digest):
        raise CorruptKernel("content hash does not match")
    if key is not None:
        if not flags & SIGNED:
            raise CorruptKernel("unsigned, but a signing key is configured")
        if not same(_mac(key, flags, address, body), mac):
            raise CorruptKernel("bad signature")
    return Kernel.from_files(address, _split(body))


def _mac(key: bytes, flags: int, address: str, body: bytes | memoryview) -> bytes:
    return keyed_digest(key, MAGIC + bytes([flags]) + address.encode(), body)


def _split(body: memoryview) -> dict[str, bytes]:
    """The files of a verified body (still bounds-checked: a hash proves origin, not sanity)."""
    files, offset = {}, 0
    for name in FILES:
        if offset + _LENGTH.size > len(body):
            raise CorruptKernel(f"envelope ends before {name}")
        (size,) = _LENGTH.unpack_from(body, offset)
        offset += _LENGTH.size
        if offset + size > len(body):
            raise CorruptKernel(f"envelope ends inside {name}")
        files[name] = bytes(body[offset:offset + size])
        offset += size
    if offset != len(body):
        raise CorruptKernel(f"{len(body) - offset} trailing bytes after the files")
    return files
