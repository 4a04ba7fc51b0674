"""An offline MNIST-1D-style dataset: ten 1-D digit templates, randomly padded, scaled, translated,
sheared and noised, resampled to 40 points.

It follows the generation recipe of Greydanus's MNIST-1D (2020; the ``mnist1d`` package's
``make_dataset`` with its default arguments: 12-point templates, padding 36-60, scale 0.4,
translation up to 48, correlated noise 0.25, i.i.d. noise 0.02, shear 0.75, 40 output points) but
is an independent implementation drawing from a ``numpy.random.Generator``, so its samples are not
the package's samples (that package imports matplotlib and requests at import time and seeds the
global RNGs). Like the original it is hard for an MLP (roughly 60-70% test accuracy) and easy for
a CNN, which leaves room for growth to matter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

TEMPLATES = np.array([
    [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
    [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
    [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
    [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
    [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
    [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
    [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
    [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
    [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
    [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
])
PADDING = (36, 60)
SCALE, MAX_SHIFT, CORR_NOISE, IID_NOISE, SHEAR, LENGTH = 0.4, 48, 0.25, 0.02, 0.75, 40


def _templates() -> np.ndarray:
    x = TEMPLATES - TEMPLATES.mean(1, keepdims=True)
    x /= x.std(1, keepdims=True)
    return (x - x[:, :1]) / 6.0  # each signal starts and ends at 0


def _resample(x: np.ndarray, n: int) -> np.ndarray:
    return np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(x)), x)


def _sample(template: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pad = PADDING[0] + int(rng.random() * (PADDING[1] - PADDING[0] + 1))
    x = np.concatenate([template + 1e-8, np.zeros(pad)])
    x = _resample(x, len(template) + PADDING[1])
    x = x * (1 + SCALE * (rng.random() - 0.5))
    x = np.roll(x, int(rng.integers(MAX_SHIFT)))
    mask = x != 0
    x = mask * x + (~mask) * gaussian_filter(CORR_NOISE * rng.standard_normal(x.shape), 2)
    x = x + IID_NOISE * rng.standard_normal(x.shape)
    x = x - SHEAR * (rng.random() - 0.5) * np.linspace(-0.5, 0.5, len(x))
    return _resample(x, LENGTH)


def make(n_samples: int = 4000, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """(x of shape (n, 40) float32, y int64), classes balanced, shuffled."""
    rng = np.random.default_rng(seed)
    templates = _templates()
    per_class = n_samples // len(templates)
    y = np.repeat(np.arange(len(templates)), per_class)
    x = np.stack([_sample(templates[label], rng) for label in y])
    order = rng.permutation(len(y))
    x = x[order]
    return ((x - x.mean()) / x.std()).astype(np.float32), y[order].astype(np.int64)


def write_npz(path: Path, n_samples: int = 4000, seed: int = 42) -> Path:
    """Write the dataset as the ``.npz`` (arrays ``x`` and ``y``) a recipe's ``source: file`` reads."""
    if not path.exists():
        x, y = make(n_samples, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=x, y=y)
    return path
