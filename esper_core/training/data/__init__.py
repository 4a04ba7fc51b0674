"""Datasets: turn a recipe's ``data`` section into train/val/test splits.

Everything is deterministic from the run seed and works offline: bundled tables, seeded generators,
a user's files, or the user's own code (``factory``). Batching is :mod:`esper_core.training.loaders`'
job; this package only builds datasets. Sources Esper loads itself come back as ``TensorDataset`` s
so whole batches are gathered with one indexing operation.

Two random streams are derived from the seed (``numpy.random.SeedSequence(seed).spawn``): one for the
split and one for the generators, so changing the split fractions never changes the generated samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from esper_core.errors import RECIPE_FIELD, ConfigError, Problem
from esper_core.recipe.schema import DataConfig
from esper_core.training.data.bundled import bundled
from esper_core.training.data.factory import call_factory, from_factory, import_factory
from esper_core.training.data.files import open_data, read_table, read_text
from esper_core.training.data.generators import mnist1d, synthetic, teacher
from esper_core.training.data.splits import DataSplits, split_arrays, split_indices

__all__ = ["DataSplits", "build_data", "call_factory", "import_factory", "split_indices"]

_TABULAR = ("breast_cancer", "wine", "diabetes", "synthetic", "teacher", "mnist1d")
_REGRESSION_SOURCES = ("diabetes",)


def build_data(cfg: DataConfig, seed: int, base_dir: Path, kind: str = "classification",
               target_key: str = "labels") -> DataSplits:
    """Build the splits the recipe asks for; ``base_dir`` anchors a relative ``cfg.path``; ``kind`` is
    the task's kind (classification data is checked for class ids and split stratified).

    Raises ConfigError for anything the user can fix (bad file, bad factory, impossible split).
    """
    split_seq, synth_seq = np.random.SeedSequence(seed).spawn(2)
    split_rng, synth_rng = np.random.default_rng(split_seq), np.random.default_rng(synth_seq)
    classification = kind == "classification"
    if cfg.source == "factory":
        return from_factory(cfg, split_rng, kind, target_key)
    if cfg.source == "text":
        return _fingerprinted(read_text(base_dir / str(cfg.path), cfg), base_dir / str(cfg.path))
    if cfg.layout == "image" and cfg.source in _TABULAR:
        raise ConfigError(Problem(RECIPE_FIELD, f"source '{cfg.source}' is tabular and has no image layout; "
                                  "use `layout: flat`", field="data.layout"))
    if kind != "custom" and cfg.source != "file" and (cfg.source in _REGRESSION_SOURCES) != (kind == "regression"):
        wanted = "regression" if cfg.source in _REGRESSION_SOURCES else "classification"
        raise ConfigError(Problem(RECIPE_FIELD, f"source '{cfg.source}' is a {wanted} dataset but the task is "
                                  f"'{kind}'; set `task.kind: {wanted}`", field="data.source"))
    if cfg.source == "synthetic":
        arrays = synthetic(cfg.synthetic, synth_rng)
    elif cfg.source == "teacher":
        arrays = teacher(cfg.teacher, synth_rng)
    elif cfg.source == "mnist1d":
        arrays = mnist1d(cfg.mnist1d, synth_rng)
    elif cfg.source == "file":
        arrays = read_table(base_dir / str(cfg.path), cfg.label_column, cfg.layout, classification)
        return _fingerprinted(split_arrays(arrays, cfg, split_rng), base_dir / str(cfg.path))
    else:
        arrays = bundled(cfg.source, cfg.layout)
    return split_arrays(arrays, cfg, split_rng)


def _fingerprinted(splits: DataSplits, path: Path) -> DataSplits:
    """``splits`` with the sha256 of the file they were read from (read once more, streamed)."""
    with open_data(path) as handle:  # not a plain open: a FIFO put there since would block it
        return dataclasses.replace(splits, fingerprint=hashlib.file_digest(handle, "sha256").hexdigest())
