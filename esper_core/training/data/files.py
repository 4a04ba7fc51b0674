"""Data a user points a recipe at: ``.npz``/``.csv`` tables (``source: file``) and plain text (``source: text``).

Every defect is a ConfigError naming the file (and the line, for CSV), never a traceback. Each file is
opened through :func:`open_data`: something other than a regular file is refused, never read (a FIFO
would block forever).
"""

from __future__ import annotations

import csv
import io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import TensorDataset

from esper_core.errors import ConfigError, Problem
from esper_core.recipe.schema import DataConfig
from esper_core.safe_read import UnsafeInput, open_regular
from esper_core.training.data.splits import Arrays, DataSplits

MAX_TEXT_BYTES = 256 << 20


def open_data(path: Path) -> BinaryIO:
    """``path``, a data file the recipe names, opened for reading if it is a regular file (links are
    followed); a ConfigError naming it otherwise, never an ``open`` that waits for a FIFO's writer."""
    try:
        return os.fdopen(open_regular(path, follow_links=True), "rb")
    except FileNotFoundError:
        raise ConfigError(Problem(str(path), "file not found")) from None
    except UnsafeInput as exc:
        raise ConfigError(Problem(str(path), str(exc))) from None


def read_table(path: Path, label_column: str, layout: str, classification: bool) -> Arrays:
    """A user's ``.npz`` or ``.csv`` file; ``classification`` labels are renumbered 0..K-1 in sorted
    order, regression targets are kept as float32 values."""

    def fail(message: str, line: int | None = None) -> ConfigError:
        return ConfigError(Problem(str(path), message, line=line))

    with open_data(path) as handle:
        if path.suffix.lower() == ".npz":
            x, y = _read_npz(handle, fail)
        elif path.suffix.lower() == ".csv":
            x, y = _read_csv(handle, label_column, fail)
        else:
            raise fail(f"unsupported file type '{path.suffix}'; use .npz or .csv")
    if not np.isfinite(x).all():
        raise fail("x contains NaN or infinite values")
    if layout == "flat":
        x = x.reshape(len(x), -1)
    elif x.ndim == 3:  # (N, H, W) grey-level images
        x = x[:, None]
    elif x.ndim != 4:
        raise fail(f"layout 'image' needs x of shape (N, C, H, W) or (N, H, W), got {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not classification:
        if y.dtype.kind not in "biuf" or not np.isfinite(y.astype(np.float64)).all():
            raise fail("regression targets must be finite numbers")
        y = y.astype(np.float32)
        return Arrays(x, y, 1 if y.ndim == 1 else int(np.prod(y.shape[1:])), path.name)
    y = _class_ids(y, fail)
    classes, y = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise fail("labels hold a single class; classification needs at least 2")
    return Arrays(x, y.astype(np.int64), len(classes), path.name)


def _read_npz(handle: BinaryIO, fail: Callable[..., ConfigError]) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x`` (N, ...) and ``y`` (N,); pickled object arrays are refused, never loaded."""
    try:
        archive = np.load(handle, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise fail("holds a single array; expected an .npz archive with arrays 'x' and 'y'")
        with archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise fail(f"missing array {', '.join(map(repr, missing))} "
                           f"(found: {', '.join(archive.files) or 'none'})")
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # not an archive, or pickled objects
        raise fail(f"not a readable .npz of numeric arrays: {exc}") from None
    if x.dtype.kind not in "biuf":
        raise fail(f"x must be numeric, got dtype {x.dtype}")
    if x.ndim < 2:
        raise fail(f"x must have one row per sample, shape (N, features...), got {x.shape}")
    if y.ndim < 1 or len(y) != len(x):
        raise fail(f"y must have one row per sample to match x {x.shape}, got {y.shape}")
    return x, y


def _read_csv(handle: BinaryIO, label_column: str,
              fail: Callable[..., ConfigError]) -> tuple[np.ndarray, np.ndarray]:
    """A numeric table with a header row; the label column is split off, every other one is a feature."""
    try:
        reader = csv.reader(io.TextIOWrapper(handle, encoding="utf-8", newline=""))
        rows = [(reader.line_num, row) for row in reader if row]  # line_num: for messages
    except (UnicodeDecodeError, csv.Error) as exc:
        raise fail(f"not a readable UTF-8 CSV file: {exc}") from None
    if not rows:
        raise fail("empty file; expected a header row")
    header = [name.strip() for name in rows[0][1]]
    if label_column not in header:
        raise fail(f"no label column '{label_column}' (columns: {', '.join(header)}); "
                   "set `data.label_column`", line=1)
    if len(rows) == 1:
        raise fail("no data rows after the header")
    table = np.empty((len(rows) - 1, len(header)), dtype=np.float64)
    for i, (line, row) in enumerate(rows[1:]):
        if len(row) != len(header):
            raise fail(f"{len(row)} fields, the header has {len(header)}", line=line)
        for j, cell in enumerate(row):
            try:
                table[i, j] = float(cell)
            except ValueError:
                raise fail(f"column '{header[j]}': {cell!r} is not a number", line=line) from None
    label = header.index(label_column)
    return np.delete(table, label, axis=1), table[:, label]


def _class_ids(y: np.ndarray, fail: Callable[..., ConfigError]) -> np.ndarray:
    """Labels must be integer-valued: a fractional one means a regression target, not a class."""
    if y.dtype.kind not in "biuf":
        raise fail(f"labels must be integer class ids, got dtype {y.dtype}")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise fail("labels must be integer class ids; found fractional or non-finite values")
    return y.astype(np.int64)


def read_text(path: Path, cfg: DataConfig) -> DataSplits:
    """A UTF-8 text file as character sequences for a language model.

    The vocabulary is every character of the file (sorted, so ids are stable); the stream is split
    contiguously (train, then val, then test, by ``val_fraction``/``test_fraction``) before it is cut
    into windows of ``text.seq_len`` characters every ``text.stride``, so no window crosses a split.
    Samples are ``(ids, ids)``: a causal ``language_model`` task shifts the targets itself.
    """
    def fail(message: str) -> ConfigError:
        return ConfigError(Problem(str(path), message))

    with open_data(path) as handle:
        if os.fstat(handle.fileno()).st_size > MAX_TEXT_BYTES:
            raise fail(f"larger than {MAX_TEXT_BYTES >> 20} MiB")
        try:
            text = io.TextIOWrapper(handle, encoding="utf-8").read()  # newlines as Path.read_text reads them
        except UnicodeDecodeError as exc:
            raise fail(f"not UTF-8 text: {exc}") from None
    vocab = sorted(set(text))
    if len(vocab) < 2:
        raise fail("holds fewer than two distinct characters")
    lookup = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([lookup[ch] for ch in text], dtype=torch.int64)
    length, stride = cfg.text.seq_len, cfg.text.stride or cfg.text.seq_len
    n_test, n_val = round(len(ids) * cfg.test_fraction), round(len(ids) * cfg.val_fraction)
    parts = (ids[:len(ids) - n_val - n_test], ids[len(ids) - n_val - n_test:len(ids) - n_test], ids[len(ids) - n_test:])
    splits = []
    for name, part in zip(("train", "val", "test"), parts):
        if len(part) < length:
            raise fail(f"its {name} part has {len(part)} characters, fewer than text.seq_len {length}: use a "
                       "longer text or a shorter seq_len")
        windows = part.unfold(0, length, stride).contiguous()
        splits.append(TensorDataset(windows, windows))
    return DataSplits(*splits, input_shape=(length,), num_classes=len(vocab), name=path.name)
