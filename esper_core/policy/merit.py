"""Gradient merit: how much a layer would gain from new capacity, measured from its host gradient.

For a Linear host ``W`` the gradient ``G = dL/dW`` is the expected outer product of the output
gradient and the input, so its top singular value is the first-order loss decrease a unit-norm
rank-1 residual branch could buy (the GradMax/TINY argument); convolutions are read as
``out x (in * kh * kw)`` matrices. It is divided by the weight norm so layers of different size are
comparable, and averaged over measurements because one mini-batch is too noisy to rank layers on.

The top singular value is estimated by power iteration on ``G^T G`` with one persistent unit vector
per layer (on the shorter side of ``G``): each measurement runs ``POWER_ITERATIONS`` matvec pairs
from the vector the previous measurement left, so the vector keeps converging across measurements
while the gradient drifts slowly, and a measurement costs ``4 * POWER_ITERATIONS`` FLOPs per weight
instead of a full SVD. The estimate ``||G^T G v|| / ||G v||`` never exceeds the true value and is
accurate to second order in the vector's error. The vector is part of the state dict, so a resumed
run measures what the uninterrupted one would have.

The running averages stay on the device: reading them is the only host-device sync, done when the
policy actually decides. A measurement with a non-finite gradient or score is not folded (and does
not move the vector): see :class:`~esper_core.policy.signals.RunningAverage`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from esper_core.policy.signals import RunningAverage, all_finite
from esper_core.seeds.manager import SeedManager

POWER_ITERATIONS = 2
"""Matvec pairs per measurement (see the module docstring)."""

_START_SEED = 20_251_130  # the persistent vectors start from a fixed draw: runs and resumes agree


class GradientMerit:
    def __init__(self, decay: float) -> None:
        self.decay = decay
        self._merit: dict[str, RunningAverage] = {}
        self._vectors: dict[str, torch.Tensor] = {}

    def observe(self, manager: SeedManager) -> None:
        """Fold the current host gradients into the running merit (call after backward)."""
        for name, layer in manager.layers.items():
            self.observe_weight(name, layer.host.weight)

    @torch.no_grad()
    def observe_weight(self, name: str, weight: torch.Tensor) -> None:
        """Fold the merit of one host weight from its ``.grad`` (nothing when it has none)."""
        if weight.grad is None:
            return
        grad = weight.grad.reshape(weight.shape[0], -1).float()
        matrix = grad if grad.shape[1] <= grad.shape[0] else grad.T  # the vector lives on the shorter side
        vector = self._vectors.get(name)
        if vector is None or vector.shape[0] != matrix.shape[1] or vector.device != matrix.device:
            vector = start_vector(matrix.shape[1], matrix.device)
        sigma, following = spectral_norm_step(matrix, vector, POWER_ITERATIONS)
        norm = torch.linalg.vector_norm(weight.detach().float())
        average = self._merit.setdefault(name, RunningAverage(self.decay))
        # an overflowing weight norm would make the score a finite but meaningless 0: reject it too
        average.fold({"merit": sigma / (norm + 1e-12)}, all_finite(following) & torch.isfinite(norm))
        self._vectors[name] = torch.where(average.ok, following, vector)

    def scores(self) -> dict[str, float]:
        """Current merit per layer with at least one finite measurement (one sync)."""
        if not self._merit:
            return {}
        names = list(self._merit)
        values = torch.stack([self._merit[n].stats()["merit"] for n in names]).tolist()
        return {name: value for name, value in zip(names, values) if math.isfinite(value)}

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """JSON: per layer the running merit, its counters and the persistent vector (float32 values
        written as exact decimal floats, so a resume continues bit for bit)."""
        out = {}
        for name, average in self._merit.items():
            state = average.state_dict()
            out[name] = {"merit": state["merit"].item(), "folds": int(state["folds"]),
                         "rejected": int(state["rejected"]), "ok": bool(state["ok"]),
                         "vector": self._vectors[name].tolist()}
        return out

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore from :meth:`state_dict`; ``ValueError`` naming the layer and field when malformed."""
        if not isinstance(state, dict):
            raise ValueError("merit: expected a mapping of layer names")
        merit: dict[str, RunningAverage] = {}
        vectors: dict[str, torch.Tensor] = {}
        for name, entry in state.items():
            if not isinstance(entry, dict) or set(entry) != {"merit", "folds", "rejected", "ok", "vector"}:
                raise ValueError(f"merit.{name}: expected the fields merit, folds, rejected, ok, vector")
            vector = entry["vector"]
            if not isinstance(vector, list) or not vector or not all(isinstance(v, float) for v in vector):
                raise ValueError(f"merit.{name}.vector: expected a non-empty list of floats")
            for key in ("folds", "rejected"):
                if type(entry[key]) is not int:
                    raise ValueError(f"merit.{name}.{key}: expected an integer")
            if not isinstance(entry["merit"], float) or not isinstance(entry["ok"], bool):
                raise ValueError(f"merit.{name}: merit must be a float and ok a boolean")
            tensor = torch.tensor(vector, dtype=torch.float32)
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"merit.{name}.vector: non-finite values")
            average = RunningAverage(self.decay)
            average.load_state_dict({"merit": torch.tensor(entry["merit"], dtype=torch.float32),
                                     "folds": torch.tensor(entry["folds"]), "rejected": torch.tensor(entry["rejected"]),
                                     "ok": torch.tensor(entry["ok"])}, device, f"merit.{name}")
            merit[name], vectors[name] = average, tensor.to(device)
        self._merit, self._vectors = merit, vectors


def start_vector(size: int, device: torch.device) -> torch.Tensor:
    """A fixed pseudo-random unit vector (its own generator: the training RNG stream is not touched)."""
    vector = torch.randn(size, generator=torch.Generator().manual_seed(_START_SEED))
    return (vector / torch.linalg.vector_norm(vector)).to(device)


def spectral_norm_step(matrix: torch.Tensor, vector: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``iterations`` power-iteration pairs on ``matrix^T matrix`` from the unit ``vector``: the
    estimate of the top singular value (``||A^T A v|| / ||A v||`` at the last step, 0 for a zero
    matrix) and the next unit vector (``vector`` itself where ``A^T A v`` vanished). No host sync."""
    tiny = torch.finfo(matrix.dtype).tiny
    sigma = torch.zeros((), device=matrix.device)
    for _ in range(iterations):
        image = matrix @ vector
        back = image @ matrix
        back_norm = torch.linalg.vector_norm(back)
        sigma = back_norm / torch.linalg.vector_norm(image).clamp_min(tiny)
        vector = torch.where(back_norm > 0, back / back_norm.clamp_min(tiny), vector)
    return sigma, vector


def merit_flops(weight_numel: int) -> int:
    """Analytic FLOPs of one merit measurement of a layer (benchmarks count them): two matvecs per
    iteration and the weight norm."""
    return 4 * POWER_ITERATIONS * weight_numel + 2 * weight_numel
