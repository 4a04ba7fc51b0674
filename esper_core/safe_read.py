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
touches anything. A hard link is no link to follow: it is the same file under a second name (``ln``,
``cp -al``), so writing it in place writes that other file too. :func:`open_regular` therefore refuses
to open for writing a file with more than one name, checked on the opened descriptor (no window for a
swap between the check and the write), and :func:`open_run_file` is how a run's own files that are
written in place (its logs, its lock) are opened: any refusal is one located error, exit 3. Files
that Esper writes to a temporary name and renames into place need none of this: a rename replaces
the name, never the file a link or another name shares.

A file the user names (a recipe, a blueprint, a data file) is opened the same way but through links
(``follow_links=True``: a link there is the user's own choice): a FIFO named as a recipe blocked
``esper train`` forever, and a device or a socket was read as an empty recipe or failed with an
``errno`` text. :class:`NotRegular` carries what stands there, so each reader can say it in its own words.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from esper_core.errors import CheckpointError, Problem

MAX_JSON_DEPTH = 64
"""Deeper than anything Esper writes (manifests, states, events and summaries stay below 10)."""

_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_OPENERS = {ord("["), ord("{")}


class UnsafeInput(ValueError):
    """A file or text that is not what it should be (wrong kind of file, too large, too deep)."""


class NotRegular(UnsafeInput):
    """Something other than a regular file stands at the path; ``kind`` says what ("a FIFO", "a directory")."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"is not a regular file (it is {kind})")
        self.kind = kind


class SharedFile(UnsafeInput):
    """A file opened for writing that has other names (hard links): its message says what to do."""


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


def _mode(path: Path) -> int | None:
    """The mode of what ``path`` names (through links), or ``None`` when that cannot be found out."""
    try:
        return os.stat(path).st_mode
    except OSError:
        return None


def sha256_regular(path: Path) -> str:
    """sha256 of a regular file (not a link, FIFO or device), streamed: model files can be large."""
    with os.fdopen(open_regular(path), "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def foreign(path: Path, directory: bool = False) -> str | None:
    """What stands at ``path`` instead of a regular file (``directory``: a real directory), such as "a
    symbolic link" or "a FIFO"; ``None`` when it is the right kind or absent (a parent that is not a
    directory included: nothing can stand there). Links are not followed."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    return None if (stat.S_ISDIR if directory else stat.S_ISREG)(mode) else _kind(mode)


def link_count(path: Path) -> int:
    """How many names (hard links) the file at ``path`` has, without following a symbolic link; 0 when
    absent. More than one: writing the file in place writes it under its other names too."""
    try:
        return os.lstat(path).st_nlink
    except FileNotFoundError:
        return 0


def shared(links: int) -> str:
    """Why a file with ``links`` names is not written in place, and what to do: one wording for the
    check before a resume and for the refusal when the file is opened."""
    return (f"a file with {links} hard links (the same file under other names, perhaps outside the run: "
            "`ln` and `cp -al` make them), which writing it in place would change too; give the run its own "
            "copy (cp FILE FILE.own && mv FILE.own FILE) or remove the other names")


def open_regular(path: Path, flags: int = os.O_RDONLY, follow_links: bool = False) -> int:
    """A descriptor of ``path`` opened with ``flags`` (``os.O_WRONLY | os.O_APPEND | os.O_CREAT`` to
    append, say) without blocking (a FIFO) and, unless ``follow_links`` (a file the user named), without
    following links, checked to be a regular file (:class:`NotRegular` otherwise), and, when opened for
    writing, to have no other name (a hard link: see the module docstring). ``O_TRUNC`` is not accepted:
    it would cut the file before it is checked (truncate with ``os.ftruncate`` after).
    ``FileNotFoundError`` passes through so callers can say "missing"."""
    writing = flags & os.O_ACCMODE != os.O_RDONLY
    if flags & os.O_TRUNC:
        raise ValueError("open_regular: O_TRUNC would truncate before the checks; use os.ftruncate after")
    flags |= getattr(os, "O_NONBLOCK", 0) | (0 if follow_links else getattr(os, "O_NOFOLLOW", 0))
    try:
        descriptor = os.open(path, flags, 0o644)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP: a symbolic link; ENXIO: a socket; EISDIR; ENOTDIR: a parent is a file; EACCES ...
        if not follow_links and os.path.islink(path):
            raise UnsafeInput(f"cannot be {'written' if writing else 'read'} (a symbolic link)") from None
        mode = _mode(path)
        if mode is not None and not stat.S_ISREG(mode):
            raise NotRegular(_kind(mode)) from None
        raise UnsafeInput(f"cannot be {'written' if writing else 'read'} ({exc.strerror})") from None
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode):
        os.close(descriptor)
        raise NotRegular(_kind(status.st_mode))
    if writing and status.st_nlink > 1:
        os.close(descriptor)
        raise SharedFile(f"cannot be written in place: it is {shared(status.st_nlink)}")
    return descriptor


def open_run_file(path: Path, flags: int) -> int:
    """:func:`open_regular` for a file of a run that Esper writes in place (its logs, its lock). A run
    directory may come from someone else, and something may be swapped in after a resume checked it
    (:func:`esper_core.training.run_files.check_run_files`) and before the file is opened: any
    refusal is then the same one-line error as that check's, naming the file (exit 3), never a traceback."""
    try:
        return open_regular(path, flags)
    except SharedFile as exc:
        raise CheckpointError(Problem(str(path), str(exc))) from None
    except UnsafeInput as exc:
        raise CheckpointError(Problem(str(path), f"{exc}: a run's files are written only inside the run, never "
                                      "where a link points; restore the file or remove what is there")) from None
