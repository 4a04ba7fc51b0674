"""Resolved blueprint -> a seed module.

Resolution (:mod:`.resolve`) is separate from construction: it checks every size, the channel
chain, the output grid and the parameter count with plain integer arithmetic, so :func:`build` only
ever sees resolved, checked ops. The resolution names are re-exported here for the callers that
build what they resolve.
"""

from __future__ import annotations

import torch
from torch import nn

from esper_core.blueprints.resolve import (HOST_OPS, MAX_DIM, MAX_PARAMS, ResolvedBlueprint, ResolvedOp, ResolveError,
                                           resolve)

__all__ = ["HOST_OPS", "MAX_DIM", "MAX_PARAMS", "ResolveError", "ResolvedBlueprint", "ResolvedOp", "SEGate", "build",
           "build_seeded", "resolve"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class SEGate(nn.Module):
    """x * sigmoid(W2 relu(W1 mean_hw(x))): reweights channels by global context."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True)))))
        return x * gate


def build(resolved: ResolvedBlueprint) -> nn.Sequential:
    """Construct the seed module (on the default device, float32) from resolved ops."""
    layers: list[nn.Module] = []
    for op in resolved.ops:
        if op.kind == "linear":
            layer: nn.Module = nn.Linear(op.in_size, op.out_size, bias=op.bias)
        elif op.kind in ("conv1d", "conv2d"):
            conv = nn.Conv1d if op.kind == "conv1d" else nn.Conv2d
            layer = conv(op.in_size, op.out_size, op.kernel, op.stride, op.padding, op.dilation, op.groups,
                         bias=op.bias)
        elif op.kind == "avg_pool":
            layer = nn.AvgPool2d(op.kernel, op.stride, op.padding)
        elif op.kind == "se_gate":
            layer = SEGate(op.in_size, op.out_size)
        elif op.kind == "dropout":
            layer = nn.Dropout(op.p)
        else:
            layer = _ACTIVATIONS[op.kind]()
        _initialise(layer, op.init)
        layers.append(layer)
    return nn.Sequential(*layers)


def build_seeded(resolved: ResolvedBlueprint, seed: int) -> nn.Sequential:
    """:func:`build` with initial weights drawn from ``seed`` (on the CPU), leaving the global RNG as it
    was: each germination gets its own weights, and reruns get the same ones."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(resolved)


def _initialise(layer: nn.Module, init: str) -> None:
    if init == "default":
        return
    with torch.no_grad():
        for param in layer.parameters():
            if init == "zeros":
                param.zero_()
            else:  # "small": keep the default direction, shrink the scale
                param.mul_(1e-3)
