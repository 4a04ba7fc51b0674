"""Targets: the host shapes a kernel is compiled for.

A :class:`Target` is everything of a :class:`KernelSpec` except the blueprint. Targets come from a
recipe (every distinct host layer the recipe's seeds can grow on, with the input shape that layer
really sees: :func:`esper_core.training.targets.recipe_targets`) or from the command line
(``--linear IN:OUT``, ``--conv1d IN:OUT:K:S:P[:L]``, ``--conv2d IN:OUT:K:S:P[:HxW]``).
Blueprint files cannot carry targets: the IR forbids unknown keys, and the IR is hashed into every
address, so a target list inside it would change the kernels it describes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from esper_core.blueprints.host import DEFAULT_GRID, HostSpec
from esper_core.blueprints.ir import Blueprint
from esper_core.compiler.kernels import KernelSpec
from esper_core.errors import ConfigError, Problem

COMMAND_LINE = "command line"
DEFAULT_RANK = 8
"""``rank`` of command-line targets when neither a recipe nor ``--rank`` gives one."""


@dataclass(frozen=True)
class Target:
    """``blueprint_kind`` is ``branch`` (one layer) or ``span`` (a layer pair, whose host is the first
    layer's geometry with the second one's output size) for a recipe's targets; ``None`` (command-line
    targets) serves blueprints of either kind."""

    host: HostSpec
    input_shape: tuple[int, ...]
    rank: int = DEFAULT_RANK
    dtype: str = "float32"
    device: str = "cpu"
    blueprint_kind: str | None = None

    def serves(self, blueprint: Blueprint) -> bool:
        return blueprint.host == self.host.kind and self.blueprint_kind in (None, blueprint.kind)

    def spec(self, blueprint: Blueprint) -> KernelSpec:
        return KernelSpec(blueprint, self.host, self.rank, self.dtype, self.device, self.input_shape)


_INT = r"([1-9]\d*)"
_LINEAR = re.compile(rf"^{_INT}:{_INT}$")
_CONV = re.compile(rf"^{_INT}:{_INT}:{_INT}:{_INT}:(0|{_INT})(?::{_INT}x{_INT})?$")
_CONV1D = re.compile(rf"^{_INT}:{_INT}:{_INT}:{_INT}:(0|{_INT})(?::{_INT})?$")
DEFAULT_LENGTH = 16
"""Input length of a ``--conv1d`` target that gives none (the example length of ``esper blueprints show``)."""


def parse_linear(text: str, option: str = "--linear") -> Target:
    """``IN:OUT`` -> a Linear target with input shape ``(IN,)``."""
    match = _LINEAR.match(text.strip())
    if match is None:
        raise ConfigError(Problem(COMMAND_LINE, f"{text!r} is not IN:OUT (e.g. 64:32)", field=option))
    n_in, n_out = int(match[1]), int(match[2])
    return Target(HostSpec("linear", n_in, n_out), (n_in,))


def parse_conv2d(text: str, option: str = "--conv2d") -> Target:
    """``IN:OUT:K:S:P[:HxW]`` -> a Conv2d target (square kernel, stride, padding; default grid 8x8)."""
    match = _CONV.match(text.strip())
    if match is None:
        raise ConfigError(Problem(COMMAND_LINE, f"{text!r} is not IN:OUT:KERNEL:STRIDE:PADDING[:HxW] "
                                  "(e.g. 16:32:3:2:1:8x8)", field=option))
    n_in, n_out, k, s, p = (int(match[i]) for i in (1, 2, 3, 4, 5))
    grid = (int(match[7]), int(match[8])) if match[7] else DEFAULT_GRID
    host = HostSpec("conv2d", n_in, n_out, (k, k), (s, s), (p, p))
    if min(host.output_size(*grid)) < 1:
        raise ConfigError(Problem(COMMAND_LINE, f"{text!r}: a {grid[0]}x{grid[1]} input gives an empty output",
                                  field=option))
    return Target(host, (n_in, *grid))


def parse_conv1d(text: str, option: str = "--conv1d") -> Target:
    """``IN:OUT:K:S:P[:LENGTH]`` -> a Conv1d target (default input length 16). Without it a Conv1d
    blueprint could be compiled only with ``--for`` a recipe, and ``--check`` told its author to give a
    target of its kind that no option could express."""
    match = _CONV1D.match(text.strip())
    if match is None:
        raise ConfigError(Problem(COMMAND_LINE, f"{text!r} is not IN:OUT:KERNEL:STRIDE:PADDING[:LENGTH] "
                                  "(e.g. 16:32:3:1:1:40)", field=option))
    n_in, n_out, k, s, p = (int(match[i]) for i in (1, 2, 3, 4, 5))
    length = int(match[7]) if match[7] else DEFAULT_LENGTH
    host = HostSpec("conv1d", n_in, n_out, (k,), (s,), (p,), (1,))
    if min(host.output_size(length)) < 1:
        raise ConfigError(Problem(COMMAND_LINE, f"{text!r}: an input of length {length} gives an empty output",
                              field=option))
    return Target(host, (n_in, length))


def with_options(target: Target, rank: int | None = None, dtype: str | None = None,
                 device: str | None = None) -> Target:
    """``target`` with a rank, dtype and device class where given."""
    return replace(target, rank=target.rank if rank is None else rank, dtype=dtype or target.dtype,
                   device=device or target.device)
