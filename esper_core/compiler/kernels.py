"""Kernels: one blueprint built for one target.

A kernel is identified by its content address, the sha256 of everything that determines the
module it builds and the figures measured on it: the canonical IR, the target (host geometry, the
resolved ``rank``, the per-sample input and output shapes, dtype and device class) and the torch
version. Two runs that ask for the same kernel get the same address, which is what lets stores and
caches share them; a new torch version gives new addresses, so a stale kernel is never served.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esper_core.blueprints.builder import ResolvedBlueprint, build, resolve
from esper_core.blueprints.host import HostSpec
from esper_core.blueprints.ir import Blueprint

DTYPES = ("float32", "float64", "float16", "bfloat16")
DEVICE_CLASSES = ("cpu", "cuda")


@dataclass(frozen=True)
class KernelSpec:
    """What to compile: a blueprint for one host layer, rank, dtype, device class and input shape.

    ``input_shape`` is one sample's input to the host layer: ``(..., in)`` for a Linear host,
    ``(in, H, W)`` for a Conv2d host. Left out, it is ``(in,)`` or ``(in, 8, 8)``. It does not change
    the module (a seed works for any batch and grid) but it fixes the FLOPs and the latency in the
    manifest, so it is part of the address.
    """

    blueprint: Blueprint
    host: HostSpec
    rank: int
    dtype: str = "float32"
    device: str = "cpu"
    input_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.device not in DEVICE_CLASSES:
            raise ValueError(f"device class must be one of {', '.join(DEVICE_CLASSES)}, not {self.device!r}")
        shape = self.sample_shape
        misfit = self.host.sample_problem(shape)
        if misfit is not None:
            raise ValueError(misfit)
        if any(size < 1 for size in shape):
            raise ValueError(f"input shape {shape} has an empty dimension")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The per-sample input shape, with the default filled in."""
        if self.input_shape is not None:
            return tuple(self.input_shape)
        return self.host.default_input_shape()

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The host's per-sample output shape, which the seed must reproduce."""
        shape = self.sample_shape
        if self.host.kind == "linear":
            return (*shape[:-1], self.host.out_features)
        return (self.host.out_features, *self.host.output_size(*shape[1:]))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def target_json(self) -> dict[str, Any]:
        """Everything about the target, as recorded in the manifest and hashed into the address."""
        return {"host": self.host.to_json(), "rank": self.rank, "dtype": self.dtype, "device": self.device,
                "input_shape": list(self.sample_shape), "output_shape": list(self.output_shape)}

    def to_json(self) -> dict[str, Any]:
        """A plain-data form: what crosses the process boundary to a compile worker (never a module)."""
        return {"ir": json.loads(self.blueprint.canonical_json()), "target": self.target_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KernelSpec:
        target = data["target"]
        return cls(Blueprint.model_validate(data["ir"]), HostSpec.from_json(target["host"]), target["rank"],
                   target["dtype"], target["device"], tuple(target["input_shape"]))

    def address(self) -> str:
        return address_of(self.to_json(), torch.__version__)

    def label(self) -> str:
        """A short human description of the target, e.g. ``conv2d 16->32 k3 s2 p1 @ 16x8x8``."""
        host = self.host
        text = f"{host.kind} {host.in_features}->{host.out_features}"
        if host.kind != "linear":
            text += f" k{_pair(host.kernel)} s{_pair(host.stride)} p{_pair(host.padding)}"
            if host.dilation != (1, 1):
                text += f" d{_pair(host.dilation)}"
        text += f" @ {'x'.join(map(str, self.sample_shape))} rank {self.rank}"
        if self.dtype != "float32" or self.device != "cpu":
            text += f" {self.dtype} {self.device}"
        return text

    def resolve(self) -> ResolvedBlueprint:
        return resolve(self.blueprint, self.host, self.rank)

    def init_seed(self) -> int:
        """Seed of the kernel's initial weights, derived from its address so a recompile (after a
        corrupt store entry, or on another machine) produces the same weights bit for bit."""
        return int(self.address()[:15], 16)


def address_of(spec_json: dict[str, Any], torch_version: str) -> str:
    """sha256 of canonical IR + target + torch version (also recomputed from a manifest on read)."""
    payload = {"ir": spec_json["ir"], "target": spec_json["target"], "torch": torch_version}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _pair(pair: tuple[int, ...] | str) -> str:
    if isinstance(pair, str):
        return pair
    return str(pair[0]) if len(set(pair)) == 1 else "x".join(map(str, pair))


def build_kernel(spec: KernelSpec) -> tuple[nn.Module, str]:
    """Build the seed module for ``spec`` with fresh weights drawn from torch's global RNG."""
    return build(spec.resolve()), spec.address()
