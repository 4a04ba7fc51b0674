"""Mixed precision for ``esper train``: autocast for forward passes, loss scaling for fp16.

``trainer.precision: bf16`` runs forward passes (training, validation, verdicts) under autocast in
bfloat16; parameters, optimizer state and gradients stay float32. ``fp16`` does the same in float16
and scales the loss (``torch.amp.GradScaler``) so small gradients survive; the gradients are
unscaled before anything reads them (health measurement, clipping), and the scaler is handed to the
growth controller so an incubating seed's proximal pull is scaled like the gradient it joins. The
scaler's state is part of the run's state (checkpoints, rollbacks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def kernel_dtype(choice: str) -> str | None:
    """The dtype seeds' kernels are validated in under ``trainer.precision`` (``None``: the host's)."""
    dtype = DTYPES.get(choice)
    return str(dtype).removeprefix("torch.") if dtype is not None else None


class Precision:
    def __init__(self, choice: str, device: torch.device) -> None:
        self.choice = choice
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type, enabled=choice == "fp16")

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (``None``: full precision)."""
        return DTYPES.get(self.choice)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` (scaled for fp16; gradients accumulate until :meth:`unscale`)."""
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale the accumulated gradients in place (fp16; once per step, before anything reads them)."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; with fp16 skipped when gradients overflowed, and the scale updated."""
        if not self.scaler.is_enabled():
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return dict(self.scaler.state_dict()) if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler.is_enabled() and state:
            self.scaler.load_state_dict(state)
