"""Datasets that ship inside the package (:mod:`esper_core.datasets`): nothing is downloaded."""

from __future__ import annotations

import numpy as np

from esper_core.datasets import load_table
from esper_core.training.data.splits import Arrays


def bundled(source: str, layout: str) -> Arrays:
    """``digits``, ``breast_cancer``, ``wine`` (classification) or ``diabetes`` (regression)."""
    table = load_table(source)
    x = table[:, :-1].astype(np.float32)
    if source == "diabetes":
        return Arrays(x, table[:, -1].astype(np.float32), 1, source)
    if layout == "image":  # only digits gets here: 8x8 grey-level images
        x = x.reshape(-1, 1, 8, 8)
    y = table[:, -1].astype(np.int64)
    return Arrays(x, y, int(y.max()) + 1, source)
