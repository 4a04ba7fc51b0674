"""Datasets from the user's own code: ``data.factory: package.module:function``.

A factory returns one Dataset (split here) or a ready ``(train, val, test)`` tuple. Map-style and
iterable datasets are both accepted; samples are ``(input, target)`` pairs or dicts. What Esper must
know is read from the data itself: the input shape from a first sample, and for classification the
labels (from a ``targets`` attribute, or one pass) to split stratified and count the classes.
A recipe naming a factory runs that code: treat such recipes as code.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from esper_core.errors import RECIPE_FIELD, ConfigError, Problem
from esper_core.recipe.load import importing_from
from esper_core.recipe.schema import DataConfig
from esper_core.training.data.splits import DataSplits, feature_stats, split_indices

_STATS_BATCH = 1024  # samples per batch when a dataset must be read through


def import_factory(spec: str, field: str) -> Callable[..., Any]:
    """Resolve a user's ``package.module:function``; failures name the factory and the recipe field."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        directory = importing_from()
        beside = f"{directory} (the recipe's directory)" if directory else "the recipe's directory"
        raise ConfigError(Problem(RECIPE_FIELD, f"cannot import '{spec}': {exc} (is the module installed, in "
                                  f"{beside}, or in a directory on PYTHONPATH?)", field=field)) from None
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


def from_factory(cfg: DataConfig, rng: np.random.Generator, kind: str, target_key: str) -> DataSplits:
    """The splits of a factory's data for a task of ``kind``: class ids are counted for classification
    (and the split stratified), token ids for a language model or token classifier (the vocabulary)."""
    spec = str(cfg.factory)
    classification = kind == "classification"

    def fail(message: str) -> ConfigError:
        return ConfigError(Problem(RECIPE_FIELD, f"'{spec}' {message}", field="data.factory"))

    made = call_factory(import_factory(spec, "data.factory"), spec, "data.factory", cfg.factory_kwargs)
    if _is_dataset(made):
        if isinstance(made, IterableDataset):
            raise fail("returned one IterableDataset; an iterable cannot be split here: return a tuple "
                       "(train, val, test)")
        labels = _labels(made, fail, target_key) if classification else np.zeros(len(made))  # type: ignore[arg-type]
        splits = [_subset(made, i) for i in split_indices(np.asarray(labels), cfg.val_fraction,
                                                          cfg.test_fraction, rng)]
    elif isinstance(made, (tuple, list)) and len(made) == 3 and all(map(_is_dataset, made)):
        splits = list(made)
    else:
        raise fail(f"returned {type(made).__name__}; expected a torch Dataset or a tuple (train, val, test) of them")
    shapes = {_input_shape(_first(ds, fail), target_key, fail) for ds in splits}
    if len(shapes) != 1:
        raise fail(f"returned splits whose samples differ in shape: {sorted(shapes)}")
    if classification:
        outputs = max(int(_labels(ds, fail, target_key).max()) + 1 for ds in splits)
    elif kind in ("language_model", "token_classification"):
        outputs = max(_token_count(ds, fail, target_key) for ds in splits)
    else:
        target = _target(_first(splits[0], fail), target_key)
        outputs = int(np.prod(target.shape)) if isinstance(target, torch.Tensor) and target.dim() else 1
    first = _first(splits[0], fail)
    stats = None
    if (cfg.standardize and not isinstance(splits[0], IterableDataset) and not isinstance(first, Mapping)
            and first[0].is_floating_point()):
        stats = feature_stats(x for x, _ in DataLoader(splits[0], batch_size=_STATS_BATCH))
        splits = [_standardized(ds, *stats) for ds in splits]
    train, val, test = splits
    return DataSplits(train, val, test, input_shape=shapes.pop(), num_classes=outputs, name=spec,
                      target_key=target_key, input_stats=stats)


def _is_dataset(obj: object) -> bool:
    return isinstance(obj, IterableDataset) or (isinstance(obj, Dataset) and hasattr(obj, "__len__"))


def _first(ds: Dataset, fail: Callable[[str], ConfigError]) -> Any:
    if isinstance(ds, IterableDataset):
        sample = next(iter(ds), None)
    else:
        sample = ds[0] if len(ds) else None  # type: ignore[arg-type]
    if sample is None:
        raise fail("returned an empty dataset")
    if isinstance(sample, Mapping):
        return sample
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[0], torch.Tensor)):
        raise fail("must give samples (x, y) with x a tensor, or dicts of tensors")
    return sample


def _target(sample: Any, target_key: str) -> Any:
    return sample.get(target_key) if isinstance(sample, Mapping) else sample[1]


def _input_shape(sample: Any, target_key: str, fail: Callable[[str], ConfigError]) -> tuple[int, ...]:
    if not isinstance(sample, Mapping):
        return tuple(sample[0].shape)
    if target_key not in sample:
        raise fail(f"gives dict samples without the target key {target_key!r} (keys: {', '.join(sample)}); "
                   "set task.target_key")
    inputs = [k for k in sample if k != target_key]
    main = "input_ids" if "input_ids" in inputs else inputs[0] if inputs else None
    if main is None or not isinstance(sample[main], torch.Tensor):
        raise fail("gives dict samples with no tensor input")
    return tuple(sample[main].shape)


def _labels(ds: Dataset, fail: Callable[[str], ConfigError], target_key: str) -> torch.Tensor:
    """All labels of ``ds`` as a 1-D int64 tensor of non-negative class ids."""
    targets = getattr(ds, "targets", None)
    if targets is None:
        _first(ds, fail)
        batches = DataLoader(ds, batch_size=_STATS_BATCH)
        targets = torch.cat([torch.as_tensor(_target(batch, target_key)).reshape(-1) for batch in batches])
    y = torch.as_tensor(targets)
    expected = len(y) if isinstance(ds, IterableDataset) else len(ds)  # type: ignore[arg-type]
    if y.dim() != 1 or len(y) != expected or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise fail("must give one integer class id per sample as the label")
    if len(y) and y.min() < 0:
        raise fail("gave a negative label; class ids start at 0")
    return y.long()


def _token_count(ds: Dataset, fail: Callable[[str], ConfigError], target_key: str) -> int:
    """One more than the largest token id among ``ds``'s targets (the vocabulary a model must cover)."""
    if isinstance(ds, TensorDataset) and len(ds.tensors) == 2:
        targets = [ds.tensors[1]]
    else:
        targets = [torch.as_tensor(_target(batch, target_key)) for batch in DataLoader(ds, batch_size=_STATS_BATCH)]
    if any(t.is_floating_point() or t.is_complex() or t.dtype == torch.bool for t in targets):
        raise fail("must give integer token ids as targets for a language model or token classifier")
    largest = max((int(t.max()) for t in targets if t.numel()), default=-1)
    if largest < 0:
        raise fail("gave no token ids as targets (only negative, ignored ones)")
    return largest + 1


def _subset(dataset: Dataset, indices: np.ndarray) -> Dataset:
    """A split of ``dataset``; in-memory tensors stay tensors (a ``TensorDataset`` is gathered a whole
    batch at a time, and moved to the GPU once, where a ``Subset`` is fetched sample by sample)."""
    if isinstance(dataset, TensorDataset):
        index = torch.as_tensor(indices, dtype=torch.long)
        return TensorDataset(*(t[index] for t in dataset.tensors))
    return Subset(dataset, indices.tolist())


def _standardized(dataset: Dataset, mean: torch.Tensor, std: torch.Tensor) -> Dataset:
    if isinstance(dataset, TensorDataset):
        x, *rest = dataset.tensors
        return TensorDataset((x.float() - mean) / std, *rest)
    return _Standardized(dataset, mean, std)


class _Standardized(Dataset):
    """A view of a dataset whose float inputs are standardised on fetch (for datasets Esper cannot copy)."""

    def __init__(self, base: Dataset, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.base, self.mean, self.std = base, mean, std

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        x, y = self.base[index]
        return (x.float() - self.mean) / self.std, y
