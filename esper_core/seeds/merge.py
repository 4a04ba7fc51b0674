"""Folding a seed into its host: when a seed is an exact linear map of the host's input, ``host + seed``
is one layer of the host's shape.

A seed ``g`` beside a host ``f`` computes ``f(x) + alpha * g(x)``. When ``g`` is a chain of linear
ops with no nonlinearity (a low-rank adapter ``B(Ax)``; a conv with the host's geometry between
1x1 convs) it equals one layer ``W_g x + b_g`` of the host's kind and geometry, so
``f(x) + alpha * g(x) = (W_f + alpha W_g) x + (b_f + alpha b_g)``: the seed can be merged into the
host and costs no parameter and no FLOP (DESIGN: "a linear seed on a linear host adds no
expressivity: merge it"). :func:`linear_delta` decides whether a seed is such a map and returns
``(W_g, b_g)``; :func:`fold` adds ``alpha`` times it to the host. ``esper export`` uses them, and so
can fossilization later: there is one implementation of the merge.

The composition is computed in float64 on the CPU from the seed's own parameters and cast to the
host's dtype once, so the merged layer differs from ``f(x) + alpha * g(x)`` by float rounding only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from esper_core.blueprints.host import HostSpec, is_transformers_conv1d

Delta = tuple[torch.Tensor, torch.Tensor | None]
"""(weight, bias) of the single layer a mergeable seed equals; bias ``None`` when it has none."""


@dataclass(frozen=True)
class _Conv:
    """One op of a conv seed as a convolution: dense weight (out, in, kh, kw), bias, geometry."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def pointwise(self) -> bool:
        return tuple(self.weight.shape[2:]) == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)


def linear_delta(seed: nn.Module, host: HostSpec) -> Delta | None:
    """``(W, b)`` such that ``seed(x) == W x + b`` (a Linear host) or ``conv(x, W, b)`` with the host's
    geometry (a Conv2d host), or ``None`` when the seed is not exactly such a map (a nonlinearity,
    dropout, a gate, or a conv whose geometry is not the host's)."""
    ops = list(seed) if isinstance(seed, nn.Sequential) else [seed]
    if not ops:
        return None
    if host.kind == "linear":
        return _linear_chain(ops, host)
    if host.kind == "conv2d":
        return _conv_chain(ops, host)
    return None


def fold(host: nn.Module, delta: Delta, alpha: float = 1.0) -> bool:
    """Add ``alpha * delta`` to ``host``'s weight (and bias) in place; returns whether a bias had to be
    created (the host had none and the delta has one, so the layer gains ``out`` parameters). The
    delta's weight is (out, in), as ``nn.Linear`` stores it; transformers' ``Conv1D`` stores (in, out),
    so it gets the transpose (added as it is, a square Conv1D would silently compute another map)."""
    weight, bias = delta
    target = host.weight
    if is_transformers_conv1d(host):
        weight = weight.T
    created = False
    with torch.no_grad():
        merged = _cpu64(target) + alpha * _cpu64(weight)
        target.copy_(merged.to(target.device, target.dtype))
        if bias is not None and bool(torch.any(bias != 0)):
            if host.bias is None:
                give_bias(host)
                created = True
            host.bias.copy_((_cpu64(host.bias) + alpha * _cpu64(bias)).to(target.device, target.dtype))
    return created


def give_bias(host: nn.Module) -> nn.Parameter:
    """A zero bias for ``host``, which has none: what a fold of a biased seed starts from, and what a host
    rebuilt from its constructor needs before the weights of one that gained a bias that way load."""
    weight = host.weight
    out = weight.shape[1] if is_transformers_conv1d(host) else weight.shape[0]
    host.bias = nn.Parameter(torch.zeros(out, device=weight.device, dtype=weight.dtype))
    return host.bias


def merge_into(host: nn.Module, seed: nn.Module, alpha: float = 1.0) -> bool:
    """Fold ``seed`` into ``host`` when it is mergeable; returns whether it was (the host is unchanged
    otherwise)."""
    delta = linear_delta(seed, HostSpec.of(host))
    stored = host.weight.shape[::-1] if is_transformers_conv1d(host) else host.weight.shape
    if delta is None or delta[0].shape != stored:  # e.g. a grouped host conv
        return False
    fold(host, delta, alpha)
    return True


# --- Linear hosts -------------------------------------------------------------------------------------

def _linear_chain(ops: list[nn.Module], host: HostSpec) -> Delta | None:
    weight = torch.eye(host.in_features, dtype=torch.float64)
    bias: torch.Tensor | None = None
    for op in ops:
        if type(op) is not nn.Linear:  # a subclass may do anything in forward
            return None
        w = _cpu64(op.weight)
        weight = w @ weight
        bias = None if bias is None else w @ bias
        if op.bias is not None:
            bias = _cpu64(op.bias) if bias is None else bias + _cpu64(op.bias)
    if tuple(weight.shape) != (host.out_features, host.in_features):
        return None
    return weight, bias


# --- Conv2d hosts -------------------------------------------------------------------------------------

def _conv_chain(ops: list[nn.Module], host: HostSpec) -> Delta | None:
    """A chain of convs in which at most one op is spatial and that op has the host's geometry (every
    other op a 1x1, stride-1, unpadded conv) composes into one conv with the host's geometry. A bias
    before the spatial op would not: zero padding does not pad a constant, so it is refused."""
    convs: list[_Conv] = []
    channels = host.in_features
    for op in ops:
        conv = _as_conv(op, channels)
        if conv is None:
            return None
        convs.append(conv)
        channels = conv.weight.shape[0]
    spatial = [i for i, c in enumerate(convs) if not c.pointwise]
    host_pointwise = host.kernel == (1, 1) and host.stride == (1, 1) and host.padding == (0, 0)
    if len(spatial) > 1 or (not spatial and not host_pointwise):
        return None
    if spatial:
        middle = convs[spatial[0]]
        if (tuple(middle.weight.shape[2:]), middle.stride, middle.padding, middle.dilation) != (
                host.kernel, host.stride, host.padding, host.dilation):
            return None
        if any(c.bias is not None and bool(torch.any(c.bias != 0)) for c in convs[:spatial[0]]):
            return None
    weight, bias = convs[0].weight, convs[0].bias
    for conv in convs[1:]:
        if conv.pointwise:  # applied after: mix the output channels of everything so far
            mix = conv.weight[:, :, 0, 0]
            weight = torch.einsum("om,mikl->oikl", mix, weight)
            bias = None if bias is None else mix @ bias
        else:  # the spatial op after pointwise ones (whose biases are zero): mix its input channels
            weight = torch.einsum("omkl,mi->oikl", conv.weight, weight[:, :, 0, 0])
            bias = None
        if conv.bias is not None:
            bias = conv.bias if bias is None else bias + conv.bias
    if tuple(weight.shape) != (host.out_features, host.in_features, *host.kernel):
        return None
    return weight, bias


def _as_conv(op: nn.Module, channels: int) -> _Conv | None:
    """``op`` (receiving ``channels`` channels) as a dense float64 convolution when it is one: a grouped
    conv becomes block-diagonal, an average pool a depthwise conv of ``1 / area``; ``None`` otherwise."""
    if type(op) is nn.Conv2d:  # a subclass may do anything in forward
        if op.padding_mode != "zeros" or isinstance(op.padding, str) or op.in_channels != channels:
            return None
        weight = _cpu64(op.weight)
        if op.groups > 1:
            weight = _dense(weight, op.groups, op.in_channels)
        return _Conv(weight, None if op.bias is None else _cpu64(op.bias), _pair(op.stride),
                     _pair(op.padding), _pair(op.dilation))
    if type(op) is nn.AvgPool2d:
        if op.ceil_mode or not op.count_include_pad or op.divisor_override is not None:
            return None
        kernel = _pair(op.kernel_size)
        eye = torch.eye(channels, dtype=torch.float64)[:, :, None, None]
        weight = eye * torch.full(kernel, 1.0 / (kernel[0] * kernel[1]), dtype=torch.float64)
        return _Conv(weight, None, _pair(op.stride or op.kernel_size), _pair(op.padding), (1, 1))
    return None


def _dense(weight: torch.Tensor, groups: int, in_channels: int) -> torch.Tensor:
    """A grouped conv's weight as the equivalent dense (block-diagonal) weight."""
    out_channels = weight.shape[0]
    per_in, per_out = in_channels // groups, out_channels // groups
    dense = torch.zeros(out_channels, in_channels, *weight.shape[2:], dtype=weight.dtype, device=weight.device)
    for g in range(groups):
        dense[g * per_out:(g + 1) * per_out, g * per_in:(g + 1) * per_in] = weight[g * per_out:(g + 1) * per_out]
    return dense


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _cpu64(tensor: torch.Tensor) -> torch.Tensor:
    """Merges are rare and small: composed on the CPU in float64, cast once when folded."""
    return tensor.detach().to("cpu", torch.float64)
