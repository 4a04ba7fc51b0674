"""What a seed must match about the layer it grows on."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # imported in HostSpec.of: resolving blueprints needs no PyTorch
    from torch import nn

Pair = tuple[int, int]
DEFAULT_GRID = (8, 8)
"""Spatial size of a conv host's probe input when no real input shape is known."""


@dataclass(frozen=True)
class HostSpec:
    """Kind and geometry of a host layer: everything the builder needs to size a residual seed."""

    kind: Literal["linear", "conv2d"]
    in_features: int
    out_features: int
    kernel: Pair = (1, 1)
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)

    @classmethod
    def of(cls, module: nn.Module) -> "HostSpec":
        """Describe ``module``; raises ``TypeError`` for layers a seed cannot mirror."""
        from torch import nn

        if isinstance(module, nn.Linear):
            return cls("linear", module.in_features, module.out_features)
        if isinstance(module, nn.Conv2d):
            if isinstance(module.padding, str) or module.padding_mode != "zeros":
                raise TypeError("only Conv2d hosts with numeric zero padding can host seeds")
            return cls("conv2d", module.in_channels, module.out_channels,
                       tuple(module.kernel_size), tuple(module.stride),  # type: ignore[arg-type]
                       tuple(module.padding), tuple(module.dilation))  # type: ignore[arg-type]
        raise TypeError(f"{type(module).__name__} cannot host seeds (only Linear and Conv2d)")

    def output_hw(self, h: int, w: int) -> Pair:
        """Spatial size of the host's output for an ``h x w`` input (PyTorch's conv formula)."""
        return tuple(  # type: ignore[return-value]
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip((h, w), self.kernel, self.stride, self.padding, self.dilation))

    def default_input_shape(self) -> tuple[int, ...]:
        """A per-sample input when the real one is unknown: ``(in,)`` or ``(in, 8, 8)``."""
        return (self.in_features,) if self.kind == "linear" else (self.in_features, *DEFAULT_GRID)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "HostSpec":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
