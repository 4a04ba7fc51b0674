"""Deterministic probe inputs for validation and measurement.

Every validator draws its inputs from its own seeded CPU generator, so a verdict never depends on
the caller's RNG state (and never advances it), and a failure can be reproduced exactly.
"""

from __future__ import annotations

import torch

from esper_core.compiler.kernels import KernelSpec


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def device_of(spec: KernelSpec) -> torch.device:
    return torch.device(spec.device)


def random_input(spec: KernelSpec, batch: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """A batch of standard-normal samples (times ``scale``) of the target's input shape."""
    x = torch.randn((batch, *spec.sample_shape), generator=gen) * scale
    return x.to(device=device_of(spec), dtype=spec.torch_dtype)


def feature_like_input(spec: KernelSpec, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Like :func:`random_input`, plus a random mean per sample and channel for conv targets.

    Real feature maps have per-channel means (post-ReLU ones are positive); i.i.d. zero-mean pixels
    average to almost nothing under a global pool, which would make pooled branches look dead.
    """
    x = random_input(spec, batch, gen)
    if spec.host.kind != "linear":
        offsets = torch.randn((batch, spec.sample_shape[0], *(1,) * spec.host.spatial), generator=gen)
        x = x + offsets.to(device=x.device, dtype=x.dtype)
    return x


def random_like_output(spec: KernelSpec, batch: int, gen: torch.Generator) -> torch.Tensor:
    """A random direction ``r`` in the output space (the probe of straight-through gradients)."""
    r = torch.randn((batch, *spec.output_shape), generator=gen)
    return r.to(device=device_of(spec), dtype=spec.torch_dtype)


def extreme_scale(spec: KernelSpec) -> float:
    """A large input magnitude the dtype can still carry through a few multiply-adds: 1e4 in float32,
    16 in float16 (its largest finite value is 65504)."""
    return min(1e4, torch.finfo(spec.torch_dtype).max ** 0.25)


def stress_inputs(spec: KernelSpec, batch: int, gen: torch.Generator) -> list[tuple[str, torch.Tensor]]:
    """Named inputs for finiteness and germination checks: ordinary, large random, constant extremes, zeros."""
    scale = extreme_scale(spec)
    x = random_input(spec, batch, gen)
    return [("random", x), (f"random x {scale:g}", random_input(spec, batch, gen, scale)),
            (f"constant +{scale:g}", torch.full_like(x, scale)), (f"constant -{scale:g}", torch.full_like(x, -scale)),
            ("zeros", torch.zeros_like(x))]
