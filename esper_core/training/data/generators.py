"""Seeded synthetic datasets: the same samples from the same seed on any machine, offline.

- ``synthetic``: labels from a fixed random one-hidden-layer tanh network (mildly non-linear).
- ``teacher``: labels from a random deep ReLU network (widths configurable); small students
  underfit it, which is the regime where growing capacity should pay.
- ``mnist1d``: MNIST-1D-style signals (Greydanus 2020): ten 1-D templates padded, scaled,
  translated, sheared and noised, resampled to ``length`` points. An independent implementation of
  the published recipe (not the package's samples), hard for an MLP and easy for a CNN.
"""

from __future__ import annotations

import math

import numpy as np

from esper_core.recipe.schema import Mnist1dConfig, SyntheticConfig, TeacherConfig
from esper_core.training.data.splits import Arrays

_SYNTHETIC_WIDTH = 32


def synthetic(cfg: SyntheticConfig, rng: np.random.Generator) -> Arrays:
    """Standard normal inputs; logits of a random tanh network, standardised per class so every class
    is about equally likely; the label is the argmax plus Gaussian label noise of std ``noise``."""
    x = rng.standard_normal((cfg.n_samples, cfg.n_features))
    w1 = rng.standard_normal((cfg.n_features, _SYNTHETIC_WIDTH)) / math.sqrt(cfg.n_features)
    w2 = rng.standard_normal((_SYNTHETIC_WIDTH, cfg.n_classes))
    logits = np.tanh(x @ w1) @ w2
    logits = (logits - logits.mean(axis=0)) / (logits.std(axis=0) + 1e-12)
    y = np.argmax(logits + cfg.noise * rng.standard_normal(logits.shape), axis=1)
    return Arrays(x.astype(np.float32), y.astype(np.int64), cfg.n_classes, "synthetic")


def teacher(cfg: TeacherConfig, rng: np.random.Generator) -> Arrays:
    """A random ReLU teacher ``n_features -> widths... -> n_classes`` (He-initialised, so signals keep
    their scale through depth); logits standardised per class, label = argmax. Noise-free: a
    network of the teacher's size can fit it exactly, a much narrower one cannot."""
    x = rng.standard_normal((cfg.n_samples, cfg.n_features))
    h = x
    for width in cfg.widths:
        w = rng.standard_normal((h.shape[1], width)) * math.sqrt(2.0 / h.shape[1])
        h = np.maximum(h @ w + 0.1 * rng.standard_normal(width), 0.0)
    logits = h @ (rng.standard_normal((h.shape[1], cfg.n_classes)) / math.sqrt(h.shape[1]))
    logits = (logits - logits.mean(axis=0)) / (logits.std(axis=0) + 1e-12)
    return Arrays(x.astype(np.float32), np.argmax(logits, axis=1).astype(np.int64), cfg.n_classes, "teacher")


_TEMPLATES = np.array([
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
_PADDING = (36, 60)
_SCALE, _MAX_SHIFT, _CORR_NOISE, _IID_NOISE, _SHEAR = 0.4, 48, 0.25, 0.02, 0.75


def _resample(x: np.ndarray, n: int) -> np.ndarray:
    return np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(x)), x)


def _smooth(noise: np.ndarray, sigma: float = 2.0, truncate: float = 4.0) -> np.ndarray:
    """A 1-D Gaussian filter with half-sample-symmetric borders (what the recipe's smoothing uses)."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    padded = np.pad(noise, radius, mode="symmetric")
    return np.convolve(padded, kernel / kernel.sum(), mode="valid")


def _mnist1d_sample(template: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    pad = _PADDING[0] + int(rng.random() * (_PADDING[1] - _PADDING[0] + 1))
    x = _resample(np.concatenate([template + 1e-8, np.zeros(pad)]), len(template) + _PADDING[1])
    x = x * (1 + _SCALE * (rng.random() - 0.5))
    x = np.roll(x, int(rng.integers(_MAX_SHIFT)))
    mask = x != 0
    x = mask * x + (~mask) * _smooth(_CORR_NOISE * rng.standard_normal(x.shape))
    x = x + _IID_NOISE * rng.standard_normal(x.shape)
    x = x - _SHEAR * (rng.random() - 0.5) * np.linspace(-0.5, 0.5, len(x))
    return _resample(x, length)


def mnist1d(cfg: Mnist1dConfig, rng: np.random.Generator) -> Arrays:
    """Balanced classes, shuffled, scaled to zero mean and unit variance overall."""
    templates = _TEMPLATES - _TEMPLATES.mean(1, keepdims=True)
    templates /= templates.std(1, keepdims=True)
    templates = (templates - templates[:, :1]) / 6.0  # each signal starts and ends at 0
    y = np.arange(cfg.n_samples) % len(templates)
    x = np.stack([_mnist1d_sample(templates[label], cfg.length, rng) for label in y])
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    return Arrays(((x - x.mean()) / x.std()).astype(np.float32), y.astype(np.int64), len(templates), "mnist1d")
