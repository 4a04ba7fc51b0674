"""Gradient merit: how much a layer would gain from new capacity, measured from its host gradient.

For a Linear host ``W`` the gradient ``G = dL/dW`` is the expected outer product of the output
gradient and the input, so its top singular value is the first-order loss decrease a unit-norm
rank-1 residual branch could buy (the GradMax/TINY argument); convolutions are read as
``out x (in * kh * kw)`` matrices. It is divided by the weight norm so layers of different size are
comparable, and averaged over measurements because one mini-batch is too noisy to rank layers on.
The running averages stay on the device: reading them is the only host-device sync, done when the
policy actually decides.
"""

from __future__ import annotations

import torch

from esper_core.seeds.manager import SeedManager


class GradientMerit:
    def __init__(self, decay: float) -> None:
        self.decay = decay
        self._ema: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def observe(self, manager: SeedManager) -> None:
        """Fold the current host gradients into the running merit (call after backward)."""
        for name, layer in manager.layers.items():
            weight = layer.host.weight
            if weight.grad is None:
                continue
            grad = weight.grad.reshape(weight.shape[0], -1).float()
            score = torch.linalg.matrix_norm(grad, ord=2) / (weight.float().norm() + 1e-12)
            previous = self._ema.get(name)
            self._ema[name] = score if previous is None else self.decay * previous + (1 - self.decay) * score

    def scores(self) -> dict[str, float]:
        """Current merit per layer (one sync)."""
        if not self._ema:
            return {}
        names = list(self._ema)
        values = torch.stack([self._ema[n] for n in names]).tolist()
        return dict(zip(names, values))

    def state_dict(self) -> dict[str, float]:
        return self.scores()

    def load_state_dict(self, state: dict[str, float], device: torch.device) -> None:
        self._ema = {k: torch.tensor(v, device=device) for k, v in state.items()}
