"""What a seed must match about the layer it grows on.

Hosts are Linear layers (``nn.Linear`` and transformers' GPT-2-style ``Conv1D``, which is a Linear
with its weight stored transposed) and convolutions (``nn.Conv1d``, ``nn.Conv2d``) with any padding,
including ``"same"`` and non-zero padding modes. A seed with ``geometry: host`` mirrors the host's
kernel, stride, padding amount and dilation, so its output grid matches the host's; it pads with
zeros whatever the host's padding mode, which changes only border values of a residual branch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # imported in HostSpec.of: resolving blueprints needs no PyTorch
    from torch import nn

Grid = tuple[int, ...]
Padding = tuple[int, ...] | Literal["same"]
DEFAULT_GRID = (8, 8)
"""Spatial size of a conv2d host's probe input when no real input shape is known (conv1d: 16)."""
SUPPORTED = "Linear, Conv1d, Conv2d, transformers' Conv1D"


class UnsupportedHost(TypeError):
    """A module that cannot host seeds; the message names its type and the supported ones."""


@dataclass(frozen=True)
class HostSpec:
    """Kind and geometry of a host layer: everything the builder needs to size a residual seed.
    Geometry tuples have one entry per spatial dimension (none for ``linear``)."""

    kind: Literal["linear", "conv1d", "conv2d"]
    in_features: int
    out_features: int
    kernel: Grid = (1, 1)
    stride: Grid = (1, 1)
    padding: Padding = (0, 0)
    dilation: Grid = (1, 1)

    @classmethod
    def of(cls, module: nn.Module) -> "HostSpec":
        """Describe ``module``; raises :class:`UnsupportedHost` for layers a seed cannot mirror."""
        from torch import nn

        if isinstance(module, nn.Linear):
            return cls("linear", module.in_features, module.out_features)
        if is_transformers_conv1d(module):
            weight = module.weight  # (in, out): y = x @ W + b
            return cls("linear", int(weight.shape[0]), int(weight.shape[1]))
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            kind = "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"
            padding = "same" if module.padding == "same" else tuple(module.padding)
            if padding == "valid":
                padding = (0,) * len(module.kernel_size)
            return cls(kind, module.in_channels, module.out_channels, tuple(module.kernel_size),  # type: ignore[arg-type]
                       tuple(module.stride), padding, tuple(module.dilation))  # type: ignore[arg-type]
        raise UnsupportedHost(f"{type(module).__name__} cannot host seeds (supported: {SUPPORTED})")

    @property
    def spatial(self) -> int:
        """Spatial dimensions of the host's input: 0 (linear), 1 or 2."""
        return {"linear": 0, "conv1d": 1, "conv2d": 2}[self.kind]

    def sample_problem(self, shape: tuple[int, ...]) -> str | None:
        """Why one sample of ``shape`` (no batch dimension) cannot be this host's input, or ``None``."""
        if self.kind == "linear" and (not shape or shape[-1] != self.in_features):
            return f"a linear host with {self.in_features} inputs cannot take samples of shape {shape}"
        if self.kind != "linear" and (len(shape) != 1 + self.spatial or shape[0] != self.in_features):
            return f"a {self.kind} host with {self.in_features} channels cannot take samples of shape {shape}"
        return None

    def pads(self) -> tuple[tuple[int, int], ...]:
        """(before, after) zero padding per spatial dimension (``same`` puts the odd one after)."""
        if self.padding == "same":
            totals = [d * (k - 1) for k, d in zip(self.kernel, self.dilation)]
            return tuple((t // 2, t - t // 2) for t in totals)
        return tuple((p, p) for p in self.padding)

    def output_size(self, *sizes: int) -> Grid:
        """Spatial size of the host's output for an input of ``sizes`` (PyTorch's conv formula)."""
        return tuple((size + before + after - d * (k - 1) - 1) // s + 1
                     for size, k, s, (before, after), d in zip(sizes, self.kernel, self.stride, self.pads(),
                                                               self.dilation))

    def default_input_shape(self) -> tuple[int, ...]:
        """A per-sample input when the real one is unknown: ``(in,)``, ``(in, 16)`` or ``(in, 8, 8)``."""
        if self.kind == "linear":
            return (self.in_features,)
        return (self.in_features, *(DEFAULT_GRID if self.kind == "conv2d" else (16,)))

    def spanning(self, dest: "HostSpec") -> "HostSpec":
        """The host a span seed is sized for: this (feeder) layer's input and geometry, ``dest``'s outputs
        (the seed reads what the feeder reads and adds to what ``dest`` produces)."""
        return replace(self, out_features=dest.out_features)

    def to_json(self) -> dict:
        """The fields as a dict. Not ``asdict``, which deep-copies each field through generic recursion
        (38 us, once per wrapped layer in every topology a snapshot or checkpoint records): the fields
        are strings, ints and tuples of them, immutable, so the dict can hold them as they are."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict) -> "HostSpec":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's projections), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers") \
        and getattr(getattr(module, "weight", None), "dim", lambda: 0)() == 2
