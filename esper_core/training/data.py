"""Datasets: turn a recipe's ``data`` section into train/val/test splits.

Everything here is deterministic from the run seed and works offline: the built-in sources are the
datasets bundled with scikit-learn, ``synthetic`` is generated, ``file`` reads a local ``.npz`` or
``.csv`` and ``factory`` calls the user's own code. Batching is the trainer's job; this module only
builds datasets. Sources Esper loads itself come back as ``TensorDataset`` s of float32 inputs and
int64 labels so the trainer can index whole batches at once.

Two random streams are derived from the seed (``numpy.random.SeedSequence(seed).spawn``): one for the
split and one for the synthetic generator, so changing the split fractions never changes the
generated samples. The global RNGs are never touched.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import inspect
import math
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from esper_core.errors import RECIPE_FIELD, ConfigError, Problem
from esper_core.recipe.schema import DataConfig, SyntheticConfig

_TEACHER_WIDTH = 32  # hidden width of the synthetic teacher network
_STATS_BATCH = 1024  # samples per batch when a factory dataset must be read through


@dataclass(frozen=True)
class DataSplits:
    """The three splits and what a model needs to know about them."""

    train: Dataset
    val: Dataset
    test: Dataset
    input_shape: tuple[int, ...]  # per sample, e.g. (1, 8, 8) or (64,)
    num_classes: int
    name: str


class _Arrays(NamedTuple):
    x: np.ndarray  # (N, *input_shape), float32
    y: np.ndarray  # (N,), int64 in 0..num_classes-1
    num_classes: int
    name: str


def build_data(cfg: DataConfig, seed: int, base_dir: Path) -> DataSplits:
    """Build the splits the recipe asks for; ``base_dir`` anchors a relative ``cfg.path``.

    Raises ConfigError for anything the user can fix (bad file, bad factory, impossible split).
    """
    split_seq, synth_seq = np.random.SeedSequence(seed).spawn(2)
    split_rng = np.random.default_rng(split_seq)
    if cfg.source == "factory":
        return _from_factory(cfg, split_rng)
    if cfg.layout == "image" and cfg.source in ("breast_cancer", "wine", "synthetic"):
        raise ConfigError(Problem(RECIPE_FIELD, f"source '{cfg.source}' is tabular and has no image layout; "
                                  "use `layout: flat`", field="data.layout"))
    if cfg.source == "synthetic":
        arrays = _synthetic(cfg.synthetic, np.random.default_rng(synth_seq))
    elif cfg.source == "file":
        arrays = _read_file(base_dir / str(cfg.path), cfg.label_column, cfg.layout)
    else:
        arrays = _sklearn(cfg.source, cfg.layout)
    return _split_arrays(arrays, cfg, split_rng)


def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint sorted (train, val, test) index arrays covering ``range(len(labels))``.

    Stratified by systematic sampling: samples are shuffled, grouped by class, and every
    ``1/fraction``-th one is taken. Each class then gets its proportional share to within one
    sample while the split sizes are exact, even for classes too small for per-class rounding.
    """
    n = len(labels)
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction))
    if n - n_test - n_val < 1:
        raise ConfigError(Problem(RECIPE_FIELD, f"only {n} samples: too few to fill train, val and test",
                                  field="data"))
    order = rng.permutation(n)
    order = order[np.argsort(labels[order], kind="stable")]
    test_pos = _evenly_spaced(n, n_test)
    rest = np.delete(order, test_pos)
    val_pos = _evenly_spaced(len(rest), n_val)
    return np.sort(np.delete(rest, val_pos)), np.sort(rest[val_pos]), np.sort(order[test_pos])


def _evenly_spaced(n: int, k: int) -> np.ndarray:
    """``k`` distinct positions spread evenly over ``range(n)`` (``k <= n``)."""
    return ((np.arange(k) + 0.5) * n / k).astype(np.int64)


def _split_arrays(arrays: _Arrays, cfg: DataConfig, rng: np.random.Generator) -> DataSplits:
    train_idx, val_idx, test_idx = split_indices(arrays.y, cfg.val_fraction, cfg.test_fraction, rng)
    x, y = torch.from_numpy(arrays.x), torch.from_numpy(arrays.y)
    if cfg.standardize:
        mean, std = _stats([x[train_idx]])
        x = (x - mean) / std
    return DataSplits(
        train=TensorDataset(x[train_idx], y[train_idx]),
        val=TensorDataset(x[val_idx], y[val_idx]),
        test=TensorDataset(x[test_idx], y[test_idx]),
        input_shape=tuple(arrays.x.shape[1:]),
        num_classes=arrays.num_classes,
        name=arrays.name,
    )


def _stats(batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per feature, or per channel for (N, C, H, W) images, broadcastable to a sample.

    Images use one mean/std per channel rather than per pixel: per-pixel statistics would blow up
    near-constant border pixels (digits' edges are almost always 0) into large noisy values and
    would make the same stroke look different in different places, which fights the translation
    equivariance convolutions rely on. Constant features keep std 1 (they become 0, not NaN).
    Accumulated in float64 over a stream of batches so a factory dataset need not fit in memory.
    """
    mean = m2 = None
    count = 0
    for x in batches:  # Chan et al.'s pairwise update: exact zeros for constant features
        x = x.double()
        dims = (0, 2, 3) if x.dim() == 4 else (0,)
        batch_mean = x.mean(dims, keepdim=True)
        batch_m2 = ((x - batch_mean) ** 2).sum(dims, keepdim=True)
        n = x.numel() // batch_mean.numel()
        if mean is None:
            mean, m2 = batch_mean, batch_m2
        else:
            delta = batch_mean - mean
            mean = mean + delta * n / (count + n)
            m2 = m2 + batch_m2 + delta**2 * count * n / (count + n)
        count += n
    mean, std = mean[0], (m2[0] / count).sqrt()
    std = torch.where(std > 1e-7 * (1.0 + mean.abs()), std, torch.ones_like(std))
    return mean.float(), std.float()


_BUNDLED = {"digits": ("digits.csv.gz", 0), "breast_cancer": ("breast_cancer.csv", 1), "wine": ("wine_data.csv", 1)}
"""File in scikit-learn's ``datasets/data`` folder and the header lines to skip; the last column is
the label (the same files and layout scikit-learn's own ``load_*`` functions read)."""


def _sklearn(source: str, layout: str) -> _Arrays:
    """A dataset shipped inside Esper (:mod:`esper_core.datasets`; the UCI tables scikit-learn ships)."""
    from esper_core.datasets import load_table

    table = load_table(source)
    x = table[:, :-1].astype(np.float32)
    if layout == "image":  # only digits gets here: 8x8 grey-level images
        x = x.reshape(-1, 1, 8, 8)
    y = table[:, -1].astype(np.int64)
    return _Arrays(x, y, int(y.max()) + 1, source)


def _synthetic(cfg: SyntheticConfig, rng: np.random.Generator) -> _Arrays:
    """Labels from a random teacher network (rather than Gaussian class clusters).

    Inputs are standard normal; a fixed random one-hidden-layer tanh network (width 32) gives class
    logits, each standardised over the samples so every class is about equally likely; the label is
    the argmax of the logits plus Gaussian noise of std ``cfg.noise``. The noise is label noise: the
    inputs stay clean and every class fills the whole input space, so unlike well-separated clusters
    the task does not become trivial as ``n_features`` grows, and at noise 0 a network of the
    teacher's size can fit it exactly. (The default teacher is only mildly non-linear: a linear
    model reaches about 0.9 validation accuracy on the default settings.)
    """
    x = rng.standard_normal((cfg.n_samples, cfg.n_features))
    w1 = rng.standard_normal((cfg.n_features, _TEACHER_WIDTH)) / math.sqrt(cfg.n_features)
    w2 = rng.standard_normal((_TEACHER_WIDTH, cfg.n_classes))
    logits = np.tanh(x @ w1) @ w2
    logits = (logits - logits.mean(axis=0)) / (logits.std(axis=0) + 1e-12)
    y = np.argmax(logits + cfg.noise * rng.standard_normal(logits.shape), axis=1)
    return _Arrays(x.astype(np.float32), y.astype(np.int64), cfg.n_classes, "synthetic")


def _read_file(path: Path, label_column: str, layout: str) -> _Arrays:
    """Read a user's ``.npz`` or ``.csv`` file, reporting every defect as a ConfigError on the file.

    ``layout: flat`` flattens each sample; ``image`` keeps (C, H, W) samples and gives (H, W) ones a
    channel axis. Labels of any integer values are renumbered 0..K-1 in sorted order.
    """

    def fail(message: str, line: int | None = None) -> ConfigError:
        return ConfigError(Problem(str(path), message, line=line))

    if not path.is_file():
        raise fail("file not found")
    if path.suffix.lower() == ".npz":
        x, y = _read_npz(path, fail)
    elif path.suffix.lower() == ".csv":
        x, y = _read_csv(path, label_column, fail)
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
    classes, y = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise fail("labels hold a single class; classification needs at least 2")
    return _Arrays(np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64), len(classes), path.name)


def _read_npz(path: Path, fail: Callable[..., ConfigError]) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x`` (N, ...) and ``y`` (N,); pickled object arrays are refused, never loaded."""
    try:
        archive = np.load(path, allow_pickle=False)
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
    if y.ndim != 1 or len(y) != len(x):
        raise fail(f"y must have shape ({len(x)},) to match x {x.shape}, got {y.shape}")
    return x, _class_ids(y, fail)


def _read_csv(path: Path, label_column: str,
              fail: Callable[..., ConfigError]) -> tuple[np.ndarray, np.ndarray]:
    """A numeric table with a header row; the label column is split off, every other one is a feature."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
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
    return np.delete(table, label, axis=1), _class_ids(table[:, label], fail)


def _class_ids(y: np.ndarray, fail: Callable[..., ConfigError]) -> np.ndarray:
    """Labels must be integer-valued: a fractional one means a regression target, not a class."""
    if y.dtype.kind not in "biuf":
        raise fail(f"labels must be integer class ids, got dtype {y.dtype}")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise fail("labels must be integer class ids; found fractional or non-finite values")
    return y.astype(np.int64)


def import_factory(spec: str, field: str) -> Callable[..., Any]:
    """Resolve a user's ``package.module:function``; failures name the factory and the recipe field."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(Problem(RECIPE_FIELD, f"cannot import '{spec}': {exc} (is the module installed or "
                                  "its directory on PYTHONPATH?)", field=field)) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(Problem(RECIPE_FIELD, f"'{spec}': module '{module_name}' has no callable '{attr}'",
                                  field=field))
    return fn


def call_factory(fn: Callable[..., Any], spec: str, field: str, kwargs: dict[str, Any]) -> Any:
    """Call a factory after checking the arguments against its signature.

    Only the argument check becomes a ConfigError: an exception raised inside the user's own code is
    left alone so its traceback points at the bug.
    """
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(Problem(RECIPE_FIELD, f"'{spec}' cannot be called with {sorted(kwargs)}: {exc}",
                                  field=field)) from None
    except ValueError:  # no introspectable signature (some builtins): let the call itself decide
        pass
    return fn(**kwargs)


def _from_factory(cfg: DataConfig, rng: np.random.Generator) -> DataSplits:
    """Datasets from user code: one Dataset (split here) or a ready (train, val, test) tuple.

    Labels are read from a ``targets`` attribute when the dataset has one, else by one pass over it.
    ``standardize`` reads the train split once more and normalises samples as they are fetched.
    """
    spec = str(cfg.factory)

    def fail(message: str) -> ConfigError:
        return ConfigError(Problem(RECIPE_FIELD, f"'{spec}' {message}", field="data.factory"))

    made = call_factory(import_factory(spec, "data.factory"), spec, "data.factory", cfg.factory_kwargs)
    if _is_dataset(made):
        labels = _labels(made, fail)
        idx = split_indices(labels.numpy(), cfg.val_fraction, cfg.test_fraction, rng)
        splits = [Subset(made, i.tolist()) for i in idx]
    elif isinstance(made, (tuple, list)) and len(made) == 3 and all(map(_is_dataset, made)):
        splits = list(made)
        labels = torch.cat([_labels(ds, fail) for ds in splits])
    else:
        raise fail(f"returned {type(made).__name__}; expected a map-style torch Dataset "
                   "or a tuple (train, val, test) of them")
    shapes = {_sample_shape(ds, fail) for ds in splits}
    if len(shapes) != 1:
        raise fail(f"returned splits whose samples differ in shape: {sorted(shapes)}")
    if cfg.standardize:
        mean, std = _stats(x for x, _ in DataLoader(splits[0], batch_size=_STATS_BATCH))
        splits = [_Standardized(ds, mean, std) for ds in splits]
    train, val, test = splits
    return DataSplits(train, val, test, input_shape=shapes.pop(), num_classes=int(labels.max()) + 1,
                      name=spec)


def _is_dataset(obj: object) -> bool:
    return isinstance(obj, Dataset) and not isinstance(obj, IterableDataset) and hasattr(obj, "__len__")


def _sample_shape(ds: Dataset, fail: Callable[[str], ConfigError]) -> tuple[int, ...]:
    if len(ds) == 0:
        raise fail("returned an empty dataset")
    sample = ds[0]
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[0], torch.Tensor)):
        raise fail("must give samples (x, y) with x a tensor")
    return tuple(sample[0].shape)


def _labels(ds: Dataset, fail: Callable[[str], ConfigError]) -> torch.Tensor:
    """All labels of ``ds`` as a 1-D int64 tensor of non-negative class ids."""
    targets = getattr(ds, "targets", None)
    if targets is None:
        _sample_shape(ds, fail)
        batches = DataLoader(ds, batch_size=_STATS_BATCH)
        targets = torch.cat([torch.as_tensor(y).reshape(-1) for _, y in batches])
    y = torch.as_tensor(targets)
    if y.dim() != 1 or len(y) != len(ds) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise fail("must give one integer class id per sample as the label")
    if len(y) and y.min() < 0:
        raise fail("gave a negative label; class ids start at 0")
    return y.long()


class _Standardized(Dataset):
    """A view of a dataset whose inputs are standardised on fetch (for datasets Esper cannot copy)."""

    def __init__(self, base: Dataset, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.base, self.mean, self.std = base, mean, std

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        x, y = self.base[index]
        return (x.float() - self.mean) / self.std, y
