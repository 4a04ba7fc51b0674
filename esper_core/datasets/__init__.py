"""The small tables shipped inside the package: ``digits``, ``breast_cancer``, ``wine`` (classification)
and ``diabetes`` (regression).

They make the digits recipes and the tests run offline with no other package installed. The files and
their origin and licence are in ``esper_core/datasets/data/`` (``NOTICE.md``): they are the UCI
tables as scikit-learn distributes them, so the arrays equal scikit-learn's ``load_digits()`` etc.
Only NumPy is imported: reading one takes milliseconds (digits, the largest, about 20 ms).
"""

from __future__ import annotations

import gzip
import io
from importlib import resources

import numpy as np

_FILES = {"digits": ("digits.csv.gz", 0), "breast_cancer": ("breast_cancer.csv.gz", 1), "wine": ("wine.csv.gz", 1),
          "diabetes": ("diabetes.csv.gz", 0)}
"""Name -> (file in ``data/``, header lines to skip). The header of the two that have one is
``n_samples,n_features,class names...``."""
NAMES = tuple(_FILES)


def load_table(name: str) -> np.ndarray:
    """The whole table of ``name`` as a float64 array: one row per sample, features then the class label
    (or, for ``diabetes``, the regression target).

    Raises ``KeyError`` naming the known tables for any other name.
    """
    try:
        filename, header = _FILES[name]
    except KeyError:
        raise KeyError(f"unknown bundled table {name!r} (known: {', '.join(NAMES)})") from None
    with resources.files(__name__).joinpath("data", filename).open("rb") as raw, gzip.open(raw, "rt") as text:
        return np.loadtxt(io.StringIO(text.read()), delimiter=",", skiprows=header, dtype=np.float64)
