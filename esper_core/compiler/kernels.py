"""Kernels: one blueprint built for one host shape.

A kernel is identified by its content address, the sha256 of everything that determines the
module it builds: the canonical IR, the host spec, the resolved ``rank``, the dtype, and the torch
version. Two runs that ask for the same kernel get the same address, which is what lets stores and
caches share them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn

from esper_core.blueprints.builder import ResolvedBlueprint, build, resolve
from esper_core.blueprints.host import HostSpec
from esper_core.blueprints.ir import Blueprint


@dataclass(frozen=True)
class KernelSpec:
    blueprint: Blueprint
    host: HostSpec
    rank: int
    dtype: str = "float32"

    def address(self) -> str:
        payload = {"ir": json.loads(self.blueprint.canonical_json()), "host": self.host.to_json(),
                   "rank": self.rank, "dtype": self.dtype, "torch": torch.__version__}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def resolve(self) -> ResolvedBlueprint:
        return resolve(self.blueprint, self.host, self.rank)


def build_kernel(spec: KernelSpec) -> tuple[nn.Module, str]:
    """Build the seed module for ``spec`` with fresh weights drawn from torch's global RNG."""
    return build(spec.resolve()), spec.address()
