"""Envelopes: verified before parsed, bound to their address, signed when a key is set; no pickle."""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import pytest

from esper_core.compiler.artifact import DIGEST, MANIFEST, CorruptKernel, Kernel
from esper_core.storage.envelope import open_envelope, seal

KEY = b"k" * 32
STORAGE = Path(__file__).resolve().parents[1] / "esper_core" / "storage"


def test_round_trip_signed_and_unsigned(storage_kernels: list[Kernel]) -> None:
    kernel = storage_kernels[0]
    for key in (None, KEY):
        opened = open_envelope(seal(kernel, key), kernel.address, key)
        assert dict(opened.files) == dict(kernel.files) and opened.manifest == kernel.manifest


def test_any_flipped_byte_is_rejected(storage_kernels: list[Kernel]) -> None:
    kernel = storage_kernels[0]
    blob = seal(kernel, KEY)
    for position in range(0, len(blob), max(1, len(blob) // 300)):
        damaged = bytearray(blob)
        damaged[position] ^= 0x40
        with pytest.raises(CorruptKernel):
            open_envelope(bytes(damaged), kernel.address, KEY)
    for cut in (0, 10, 70, len(blob) - 1):
        with pytest.raises(CorruptKernel):
            open_envelope(blob[:cut], kernel.address, KEY)


def test_bound_to_its_address_and_key(storage_kernels: list[Kernel]) -> None:
    first, second = storage_kernels[:2]
    with pytest.raises(CorruptKernel, match="content hash"):
        open_envelope(seal(first, None), second.address, None)  # a valid entry copied under another key
    with pytest.raises(CorruptKernel, match="bad signature"):
        open_envelope(seal(first, b"x" * 32), first.address, KEY)
    with pytest.raises(CorruptKernel, match="unsigned"):
        open_envelope(seal(first, None), first.address, KEY)


def test_a_well_formed_envelope_around_garbage_still_fails_the_kernel_checks(storage_kernels: list[Kernel]) -> None:
    """A matching content hash proves integrity, not origin: the files are still verified."""
    kernel = storage_kernels[0]
    body = pickle.dumps({"weights": b"x"})
    magic_flags = b"ESPKE1\x00"
    blob = magic_flags + hashlib.sha256(kernel.address.encode() + body).digest() + bytes(32) + body
    with pytest.raises(CorruptKernel):
        open_envelope(blob, kernel.address, None)


def test_a_deeply_nested_manifest_is_a_bad_entry_not_a_recursion_error(storage_kernels: list[Kernel]) -> None:
    """A shared tier is written by others: a manifest of 200,000 nested arrays, with its digest
    recomputed, raised RecursionError out of every lookup and out of `inspect-cache --verify`."""
    kernel = storage_kernels[0]
    nested = b"[" * 200_000 + b"]" * 200_000
    files = {**kernel.files, MANIFEST: nested, DIGEST: hashlib.sha256(nested).hexdigest().encode()}
    with pytest.raises(CorruptKernel, match="nested more than"):
        Kernel.from_files(kernel.address, files)
    forged = Kernel(kernel.address, kernel.manifest, files)
    with pytest.raises(CorruptKernel, match="nested more than"):
        open_envelope(seal(forged, None), kernel.address, None)


def test_storage_never_uses_pickle() -> None:
    pattern = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle|joblib)\b|torch\.load\(", re.M)
    offenders = [str(path) for path in STORAGE.rglob("*.py") if pattern.search(path.read_text())]
    assert offenders == []
