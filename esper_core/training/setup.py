"""Where a run trains and how its randomness is pinned down."""

from __future__ import annotations

import os
import random

import numpy as np
import torch



def select_device(choice: str) -> torch.device:
    """The device ``run.device`` names (``auto``: CUDA when present); check it first with
    :func:`esper_core.recipe.checks.check_device`."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed every generator; on CUDA also ask for deterministic kernels. PyTorch's CPU kernels used
    here are deterministic already (the bit-exact resume tests run on the CPU without the flag), and
    setting the flag imports torch's compiler stack, about two seconds of every start-up."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS's first use
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
