"""Characterisation: the figures a growth policy weighs a kernel by, recorded in its manifest.

Parameters and FLOPs are analytic (exact, and comparable across machines); latency is measured on
the target's device class, forward plus backward at a fixed probe batch, median of several runs
after a warm-up, so one scheduler hiccup does not become the kernel's reputation.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from esper_core.compiler.flops import Cost
from esper_core.compiler.kernels import KernelSpec
from esper_core.compiler.probes import generator, random_input, random_like_output

LATENCY_BATCH = 32
LATENCY_ELEMENTS = 2**24
"""Largest tensor (elements) a latency batch may hold: big feature maps get a smaller batch."""
WARMUP = 2
REPEATS = 7


def measure_latency_ms(module: nn.Module, spec: KernelSpec, batch: int = LATENCY_BATCH,
                       repeats: int = REPEATS) -> float:
    """Median wall time of one forward + backward (``d<g(x), r>``) in milliseconds."""
    gen = generator(9)
    x, r = random_input(spec, batch, gen), random_like_output(spec, batch, gen)
    module = module.train()
    times = []
    for i in range(WARMUP + repeats):
        _synchronise(spec)
        start = time.perf_counter()
        module.zero_grad(set_to_none=True)
        (module(x) * r).sum().backward()
        _synchronise(spec)
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    module.zero_grad(set_to_none=True)
    return 1e3 * statistics.median(times)


def characterise(module: nn.Module, spec: KernelSpec, cost: Cost) -> dict[str, Any]:
    """The manifest's ``characterisation`` section."""
    batch = max(1, min(LATENCY_BATCH, LATENCY_ELEMENTS // cost.peak_activation))
    return {
        "params": cost.params,
        "flops_forward": cost.forward,
        "flops_backward": cost.backward,
        "flops_unit": "per sample",
        "probe_input_shape": list(spec.sample_shape),
        "peak_activation_elements": cost.peak_activation,
        "latency_ms": round(measure_latency_ms(module, spec, batch), 4),
        "latency_batch": batch,
        "latency_what": f"forward+backward, batch {batch}, median of {REPEATS}, "
                        f"{torch.get_num_threads()} intra-op thread(s)",
        "device": spec.device,
    }


def _synchronise(spec: KernelSpec) -> None:
    if spec.device == "cuda":
        torch.cuda.synchronize()
