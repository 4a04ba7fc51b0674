"""Analytic cost of a resolved blueprint: FLOPs and activation sizes, per sample, without building it.

Every op of the IR has a closed-form cost, so the compiler can refuse a blueprint that would take a
teraFLOP per sample, or a 2**30-element activation, before a single tensor is allocated, and can
record the cost of the ones it accepts.

Conventions (documented in ``docs/compile.md``): a multiply-add is 2 FLOPs; an elementwise op
(activation, dropout mask, gate multiply, sigmoid) is 1 FLOP per element; average pooling is one
FLOP per window element. The backward pass of a linear or conv op costs twice its forward
multiply-adds (gradient of the input and of the weight); that of a parameter-free op costs as much
as its forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from esper_core.blueprints.resolve import ResolvedBlueprint, ResolvedOp
from esper_core.blueprints.host import HostSpec

MAX_FLOPS_PER_SAMPLE = 10**12
MAX_ACTIVATION_PER_SAMPLE = 2**22
"""Largest tensor a seed may take or produce, in elements per sample (16 MiB in float32; a 256-channel
64x64 feature map is 2**20). Validation runs batches of up to 16 samples, so this bounds its memory."""


@dataclass(frozen=True)
class OpCost:
    index: int
    params: int
    forward: int
    backward: int
    output_shape: tuple[int, ...]


@dataclass(frozen=True)
class Cost:
    """Per-sample cost at one input shape."""

    input_shape: tuple[int, ...]
    ops: tuple[OpCost, ...]

    @property
    def params(self) -> int:
        return sum(op.params for op in self.ops)

    @property
    def forward(self) -> int:
        return sum(op.forward for op in self.ops)

    @property
    def backward(self) -> int:
        return sum(op.backward for op in self.ops)

    @property
    def peak_activation(self) -> int:
        """Elements of the largest tensor a forward pass holds: the input or an op's output."""
        return max(math.prod(self.input_shape), *(math.prod(op.output_shape) for op in self.ops))


def analytic_cost(resolved: ResolvedBlueprint, sample_shape: tuple[int, ...]) -> Cost:
    """Walk ``sample_shape`` through the resolved ops and count each op's parameters and FLOPs."""
    shape = tuple(sample_shape)
    costs = []
    for index, op in enumerate(resolved.ops):
        forward, backward, shape = _op_cost(op, shape)
        costs.append(OpCost(index, op.params, forward, backward, shape))
    return Cost(tuple(sample_shape), tuple(costs))


def _op_cost(op: ResolvedOp, shape: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
    numel = math.prod(shape)
    if op.kind == "linear":
        rows = math.prod(shape[:-1])
        macs = rows * op.in_size * op.out_size
        bias = rows * op.out_size if op.bias else 0
        return 2 * macs + bias, 4 * macs + bias, (*shape[:-1], op.out_size)
    if op.kind in ("conv1d", "conv2d", "avg_pool"):
        channels = shape[0] if op.kind == "avg_pool" else op.out_size
        kind = "conv1d" if len(shape) == 2 else "conv2d"
        geometry = HostSpec(kind, 1, 1, op.kernel, op.stride, op.padding, op.dilation)
        out = (channels, *geometry.output_size(*shape[1:]))
        window = math.prod(op.kernel)
        if op.kind == "avg_pool":
            flops = math.prod(out) * window
            return flops, flops, out
        macs = math.prod(out) * (op.in_size // op.groups) * window
        bias = math.prod(out) if op.bias else 0
        return 2 * macs + bias, 4 * macs + bias, out
    if op.kind == "se_gate":
        channels, hidden = op.in_size, op.out_size
        macs = 2 * channels * hidden
        elementwise = 2 * numel + 2 * hidden + 2 * channels  # mean, gate multiply, biases, relu, sigmoid
        return 2 * macs + elementwise, 4 * macs + elementwise, shape
    return numel, numel, shape  # activations and dropout: one FLOP per element each way
