"""Datasets that ship with the installation: nothing is downloaded.

The tables are read straight from the CSV files scikit-learn bundles, located without importing
scikit-learn (importing it costs about two seconds of every start-up and of every resume).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from esper_core.errors import RECIPE_FIELD, ConfigError, Problem
from esper_core.training.data.splits import Arrays

_TABLES = {"digits": ("digits.csv.gz", 0, ","), "breast_cancer": ("breast_cancer.csv", 1, ","),
           "wine": ("wine_data.csv", 1, ",")}
"""Classification tables: file, header lines to skip, delimiter; the last column is the label."""


def _data_dir(source: str) -> Path:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(Problem(RECIPE_FIELD, f"'{source}' needs scikit-learn installed", field="data.source"))
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def bundled(source: str, layout: str) -> Arrays:
    """``digits``, ``breast_cancer``, ``wine`` (classification) or ``diabetes`` (regression)."""
    if source == "diabetes":
        directory = _data_dir(source)
        x = np.loadtxt(directory / "diabetes_data_raw.csv.gz", dtype=np.float64).astype(np.float32)
        y = np.loadtxt(directory / "diabetes_target.csv.gz", dtype=np.float64).astype(np.float32)
        return Arrays(x, y, 1, source)
    filename, header, delimiter = _TABLES[source]
    table = np.loadtxt(_data_dir(source) / filename, delimiter=delimiter, skiprows=header, dtype=np.float64)
    x = table[:, :-1].astype(np.float32)
    if layout == "image":  # only digits gets here: 8x8 grey-level images
        x = x.reshape(-1, 1, 8, 8)
    y = table[:, -1].astype(np.int64)
    return Arrays(x, y, int(y.max()) + 1, source)
