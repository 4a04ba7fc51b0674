"""Reading files that someone else may have written: checkpoints, run files, event logs.

Such a file may have been replaced by a FIFO (an ``open`` that never returns), a device, a
symbolic link to somewhere else, a sparse file of a terabyte, or JSON nested so deeply that
parsing it overflows the stack. Every reader of untrusted bytes goes through here, so each of
those becomes one :class:`UnsafeInput` with a plain message instead of a hang or a traceback:

- :func:`read_regular` opens without following links and without blocking, checks that the
  descriptor is a regular file, and reads at most ``limit`` bytes;
- :func:`parse_json` refuses text above a size and JSON nested deeper than a bound (checked on
  the bytes before the decoder sees them), and returns plain Python values.

A run directory that may come from someone else is also written to (a resume truncates and appends
to its logs), and a link planted there would carry those writes outside the run: :func:`open_regular`
opens for writing the same way it opens for reading, and :func:`foreign` says, without following a
link, what stands where a run's own file or directory belongs, so a writer can refuse before it
touches anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

MAX_JSON_DEPTH = 64
"""Deeper than anything Esper writes (manifests, states, events and summaries stay below 10)."""

_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_OPENERS = {ord("["), ord("{")}


class UnsafeInput(ValueError):
    """A file or text that is not what it should be (wrong kind of file, too large, too deep)."""


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file (not a link, FIFO, device or directory) of at
    most ``limit`` bytes. ``FileNotFoundError`` passes through so callers can say "missing"."""
    descriptor = open_regular(path)
    try:
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(descriptor, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(descriptor)
    if size > limit:
        raise UnsafeInput(f"larger than {limit} bytes")
    return b"".join(chunks)


def read_head(path: Path, limit: int) -> bytes:
    """At most the first ``limit`` bytes of ``path``, a regular file (a FIFO would block a plain
    ``open``); ``FileNotFoundError`` passes through."""
    descriptor = open_regular(path)
    try:
        return os.read(descriptor, limit)
    finally:
        os.close(descriptor)


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text (brackets inside strings do not count)."""
    depth = deepest = 0
    for match in _TOKENS.finditer(data):
        first = match.group()[0]
        if first in _OPENERS:
            depth += 1
            deepest = max(deepest, depth)
        elif first != ord('"'):
            depth -= 1
    return deepest


def parse_json(data: bytes | str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode JSON with a bound on size and nesting; ``UnsafeInput`` (a ``ValueError``) otherwise,
    as for malformed JSON, whose ``json.JSONDecodeError`` is also a ``ValueError``."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise UnsafeInput(f"larger than {max_bytes} bytes")
    if raw.count(b"[") + raw.count(b"{") > max_depth and nesting_depth(raw) > max_depth:
        raise UnsafeInput(f"nested more than {max_depth} levels deep")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UnsafeInput(f"not UTF-8 text ({exc.reason})") from None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISREG, "a regular file"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


def sha256_regular(path: Path) -> str:
    """sha256 of a regular file (not a link, FIFO or device), streamed: model files can be large."""
    with os.fdopen(open_regular(path), "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def foreign(path: Path, directory: bool = False) -> str | None:
    """What stands at ``path`` instead of a regular file (``directory``: a real directory), such as "a
    symbolic link" or "a FIFO"; ``None`` when it is the right kind or absent. Links are not followed."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    return None if (stat.S_ISDIR if directory else stat.S_ISREG)(mode) else _kind(mode)


def open_regular(path: Path, flags: int = os.O_RDONLY) -> int:
    """A descriptor of ``path`` opened with ``flags`` (``os.O_WRONLY | os.O_APPEND | os.O_CREAT`` to
    append, say) without following links or blocking (a FIFO), checked to be a regular file.
    ``FileNotFoundError`` passes through so callers can say "missing"."""
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(path, flags, 0o644)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP: a symbolic link; ENOTDIR: a parent is a file; EACCES ...
        kind = "a symbolic link" if os.path.islink(path) else exc.strerror
        action = "read" if flags & os.O_ACCMODE == os.O_RDONLY else "written"
        raise UnsafeInput(f"cannot be {action} ({kind})") from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise UnsafeInput(f"is not a regular file (it is {_kind(mode)})")
    return descriptor
