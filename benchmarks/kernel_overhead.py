"""Kernel overhead: an Esper-built seed against the same module written by hand in plain PyTorch.

    python benchmarks/kernel_overhead.py [--json PATH] [--device cpu|cuda] [--repeats R] [--steps N]
                                         [--threads N] [--clock wall|cpu]

For every built-in blueprint (``esper_core/blueprints/library/*.yaml``) the seed is made the way the
trainer makes it: a :class:`~esper_core.compiler.kernels.KernelSpec` for a host layer, compiled by
the full pipeline (:func:`~esper_core.compiler.pipeline.compile_kernel`: build, validate, export,
characterise, package) and turned into a trainable module by
:meth:`~esper_core.compiler.artifact.Kernel.instantiate`. The hand-written arm is the module a
PyTorch user would write for the same branch (an ``nn.Sequential`` of the same layers with the same
shapes, or a small module where the branch needs one), given the Esper module's weights, and checked
to compute the same outputs before anything is timed.

Method: one timed call is forward + ``sum().backward()`` of a batch; the arms alternate in blocks of
``--steps`` calls, ABBA order, ``--repeats`` pairs, every call timed on its own (synchronised on
CUDA); the ratio is of the two arms' median call times (medians ignore the scheduler hiccups of a
shared machine). On a CPU shared with other work, ``--threads 1 --clock cpu`` times calls by this
process's CPU time. The issue's target: every ratio <= 1.05 (``kernel_overhead_max``).

Beside it, for information (the Kasmina layer is not the builder's): ``in_layer_ratio``, a Kasmina
layer whose seed is in probation (alpha 1, what an active seed costs in training) against
``host(x) + branch(x)`` written by hand.

Adding a blueprint is one entry in ``CASES``: its host layer, its per-sample input shape and the
hand-written module. The last line printed is ``kernel_overhead_max X.XXX``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esper_core.blueprints.host import HostSpec
from esper_core.blueprints.library import BlueprintLibrary
from esper_core.compiler.kernels import KernelSpec
from esper_core.compiler.pipeline import compile_kernel
from esper_core.seeds.kasmina import KasminaLayer
from esper_core.seeds.lifecycle import SeedState

RANK = 8  # the recipe default (seeds.rank)
BATCH = {"cpu": 64, "cuda": 256}


class HandSE(nn.Module):
    """Squeeze-excitation as a user writes it: pooled context -> 1x1 -> ReLU -> 1x1 -> sigmoid gate."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True)))))


@dataclass(frozen=True)
class Case:
    """One blueprint on one host: the host layer, one sample's input shape, and the hand-written branch."""

    host: Callable[[], nn.Module]
    sample: tuple[int, ...]
    hand: Callable[[nn.Module], nn.Module]  # (host) -> the branch a user would write beside it


CASES: dict[str, Case] = {
    "lowrank_adapter": Case(lambda: nn.Linear(256, 256), (256,),
                            lambda h: nn.Sequential(nn.Linear(256, RANK, bias=False), nn.Linear(RANK, 256, bias=False))),
    "wide_mlp": Case(lambda: nn.Linear(256, 256), (256,),
                     lambda h: nn.Sequential(nn.Linear(256, 4 * RANK), nn.ReLU(), nn.Linear(4 * RANK, 256))),
    "residual_conv": Case(lambda: nn.Conv2d(32, 32, 3, padding=1), (32, 16, 16),
                          lambda h: nn.Sequential(nn.Conv2d(32, 16, 3, padding=1, bias=False), nn.ReLU(),
                                                  nn.Conv2d(16, 32, 3, padding=1))),
    "dwsep_conv": Case(lambda: nn.Conv2d(32, 32, 3, padding=1), (32, 16, 16),
                       lambda h: nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.ReLU(),
                                               nn.Conv2d(32, 32, 1))),
    "se_gate": Case(lambda: nn.Conv2d(32, 32, 3, padding=1), (32, 16, 16),
                    lambda h: nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.Conv2d(32, 32, 1), HandSE(32, 8))),
    "residual_conv1d": Case(lambda: nn.Conv1d(32, 32, 3, padding=1), (32, 64),
                            lambda h: nn.Sequential(nn.Conv1d(32, 16, 3, padding=1, bias=False), nn.ReLU(),
                                                    nn.Conv1d(16, 32, 1))),
    # span seeds: sized here for a pair of equal layers (the feeder's input, the next layer's output)
    "span_linear": Case(lambda: nn.Linear(256, 256), (256,),
                        lambda h: nn.Sequential(nn.Linear(256, RANK), nn.ReLU(), nn.Linear(RANK, 256))),
    "span_conv": Case(lambda: nn.Conv2d(32, 32, 3, padding=1), (32, 16, 16),
                      lambda h: nn.Sequential(nn.Conv2d(32, RANK, 3, padding=1), nn.ReLU(),
                                              nn.Conv2d(RANK, 32, 3, padding=1))),
}


def esper_seed(name: str, case: Case, host: nn.Module, device: torch.device) -> nn.Module:
    """The seed as the trainer gets it: compiled by the pipeline, instantiated from the kernel."""
    blueprint = BlueprintLibrary.discover().get(name).blueprint
    spec = KernelSpec(blueprint, HostSpec.of(host), RANK, "float32", device.type, case.sample)
    return compile_kernel(spec).instantiate(device)


def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the parameters of ``source``, matched in order and shape."""
    pairs = list(zip(source.parameters(), target.parameters(), strict=True))
    with torch.no_grad():
        for a, b in pairs:
            if a.shape != b.shape:
                raise RuntimeError(f"hand-written module does not mirror the seed: {tuple(a.shape)} vs {tuple(b.shape)}")
            b.copy_(a)


def nonzero(module: nn.Module) -> None:
    """Zero-initialised last layers make both arms output zero: perturb so the equality check means something."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator).to(p.device))


class InLayer(nn.Module):
    """``host(x) + branch(x)`` as a user writes a residual branch beside a layer."""

    def __init__(self, host: nn.Module, branch: nn.Module) -> None:
        super().__init__()
        self.host, self.branch = host, branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.host(x) + self.branch(x)


def kasmina_with(host: nn.Module, seed: nn.Module) -> KasminaLayer:
    """A Kasmina layer whose only seed is in probation (alpha 1): an active seed as training runs it."""
    layer = KasminaLayer(host, slots=1, eta=1.0)
    layer.germinate(0, "bench", "0" * 64, 0, step=0)
    layer.start_incubation(0, seed)
    layer.start_blending(0)
    layer.start_probation(0)
    assert layer.slots[0].state == SeedState.PROBATION
    return layer


def timed_calls(module: nn.Module, x: torch.Tensor, calls: int, sync: Callable[[], None],
                clock: Callable[[], float] = time.perf_counter) -> list[float]:
    times = []
    for _ in range(calls):
        started = clock()
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()
        sync()
        times.append(clock() - started)
    return times


def compare(a: nn.Module, b: nn.Module, x: torch.Tensor, steps: int, repeats: int, warmup: int,
            sync: Callable[[], None], clock: Callable[[], float]) -> dict[str, float]:
    """Median call time of ``a`` over that of ``b``, ABBA-interleaved."""
    for module in (a, b, a, b):
        timed_calls(module, x, warmup, sync, clock)
    samples: dict[int, list[float]] = {0: [], 1: []}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for index in ((0, 1) if r % 2 == 0 else (1, 0)):
                samples[index].extend(timed_calls((a, b)[index], x, steps, sync, clock))
    finally:
        gc.enable()
    ma, mb = statistics.median(samples[0]), statistics.median(samples[1])
    return {"ratio": ma / mb, "esper_ms": 1000 * ma, "hand_ms": 1000 * mb}


def measure_case(name: str, case: Case, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    host = case.host().to(device)
    seed = esper_seed(name, case, host, device)
    hand = case.hand(host).to(device)
    nonzero(seed)
    copy_weights(seed, hand)
    x = torch.randn(BATCH[device.type], *case.sample, device=device)
    with torch.no_grad():
        if not torch.allclose(seed(x), hand(x), rtol=1e-5, atol=1e-6):
            raise RuntimeError(f"{name}: the hand-written module computes something else than the seed")
    seed_figures = compare(seed, hand, x, args.steps, args.repeats, args.warmup, sync, clock)
    layer, plain = kasmina_with(host, seed), InLayer(host, hand)
    with torch.no_grad():
        if not torch.allclose(layer(x), plain(x), rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"{name}: the Kasmina layer computes something else than host + branch")
    layer_figures = compare(layer, plain, x, args.steps, args.repeats, args.warmup, sync, clock)
    return {"host": repr(host), "input": [BATCH[device.type], *case.sample], **seed_figures,
            "in_layer_ratio": layer_figures["ratio"], "in_layer_esper_ms": layer_figures["esper_ms"],
            "in_layer_hand_ms": layer_figures["hand_ms"]}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="calls per timed block (default 20)")
    parser.add_argument("--repeats", type=int, default=10, help="ABBA block pairs per comparison (default 10)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per arm first (default 5)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: as the process has it)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time calls by the wall clock or by this process's CPU time (CPU only)")
    args = parser.parse_args(argv)
    if min(args.steps, args.repeats) < 1 or args.warmup < 0:
        parser.error("--steps and --repeats must be at least 1, --warmup at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu times the host only: use the wall clock on CUDA")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    builtin = set(BlueprintLibrary.discover().files)
    missing = sorted(builtin - CASES.keys())
    if missing:
        parser.error(f"no benchmark case for the built-in blueprint(s) {', '.join(missing)}: add them to CASES")
    results = {name: measure_case(name, CASES[name], device, args) for name in sorted(builtin)}
    out = {"setup": {"device": _device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "clock": "process CPU time" if args.clock == "cpu" else "wall",
                     "python": platform.python_version(), "rank": RANK, "steps": args.steps,
                     "repeats": args.repeats, "warmup": args.warmup},
           "blueprints": results,
           "in_layer_ratio_max": max(r["in_layer_ratio"] for r in results.values()),
           "kernel_overhead_max": max(r["ratio"] for r in results.values())}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    s = out["setup"]
    print(f"kernel overhead: Esper-compiled seed vs hand-written PyTorch, forward+backward, {s['device']}, "
          f"torch {s['torch']}, {s['threads']} threads, {s['clock']} clock; {s['repeats']} ABBA pairs of {s['steps']} calls, "
          "ratio of median call times")
    print(f"  {'blueprint':<16} {'input':<16} {'esper ms':>9} {'hand ms':>9} {'ratio':>6}   in a Kasmina layer "
          "(probation) vs host+branch: ratio")
    for name, r in results.items():
        print(f"  {name:<16} {'x'.join(map(str, r['input'])):<16} {r['esper_ms']:9.3f} {r['hand_ms']:9.3f} "
              f"{r['ratio']:6.3f}   {r['in_layer_ratio']:.3f}")
    print(f"in_layer_ratio_max {out['in_layer_ratio_max']:.3f}")
    print(f"kernel_overhead_max {out['kernel_overhead_max']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
