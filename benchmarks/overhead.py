"""What a dormant Kasmina layer costs: training-step time of a wrapped model against the same model unwrapped.

The design promises that a Kasmina layer with no active seed costs (almost) nothing: no Python loop
over empty slots, no ``.item()``, no host-device sync. This benchmark checks that promise on the
zoo CNN (or MLP) with *every* Conv2d/Linear layer wrapped, two dormant slots each, which is the
worst case a recipe can ask for.

Method, and why:

- Both arms are one model: the wrapped one is a ``deepcopy`` of the plain one, taken before
  wrapping, so weights, shapes and kernels are identical and the only difference is the wrapper.
- One step is what training pays: ``zero_grad``, forward, cross-entropy, backward, AdamW step, on
  batches of 64 random 1x8x8 images (the digits shape) that are generated once, on the device.
- The arms run interleaved in one process, in blocks of ``--steps`` steps, ABBA order (A B, B A,
  A B, ...), so slow drift (thermal, frequency, other load) and any first-or-second position bias hit
  both arms equally.
- Every step is timed on its own and the figure is the ratio of the two arms' *median step times*.
  On a shared or virtual machine a scheduler hiccup lands on a few steps, and a median over
  ``steps * repeats`` samples per arm ignores them, where a mean over a block would not: on a
  noisy CI runner block-mean ratios ranged from 0.7 to 1.5 while the median ratio stayed put. The
  median of the per-block-pair ratios is reported beside it as a cross-check.
- Both arms warm up first (allocator, thread pools, cuDNN autotuning on CUDA). On CUDA every step
  ends with ``synchronize`` so its time is the device's, not the launch queue's; that removes the
  CPU/GPU overlap for both arms alike and exposes any host-side cost of the wrapper in full, so the
  CUDA figure is, if anything, pessimistic.
- ``torch.set_num_threads`` is left as the process has it: the figure is for the user's setup.

Usage: ``python benchmarks/overhead.py [--json PATH] [--steps N] [--repeats R] [--device cpu|cuda]
[--model cnn|mlp]``. The last line printed is ``dormant_overhead_ratio X.XXX`` (median wrapped step
time / median plain step time); the JSON file holds it with the per-arm figures and the setup.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from esper_core.recipe.schema import ModelConfig
from esper_core.seeds.manager import wrap
from esper_core.training.models import build_model

INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
BATCH = 64
POOL = 8  # distinct batches, cycled, so consecutive steps see different data as they do in training


@dataclass(frozen=True)
class Arm:
    """One side of the comparison: a model, its optimizer and a name for the table."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer


@dataclass(frozen=True)
class Outcome:
    dormant_overhead_ratio: float  # median wrapped step time / median plain step time
    paired_block_ratio: float  # median over block pairs of (wrapped block mean / plain block mean)
    plain_median_ms: float
    wrapped_median_ms: float
    plain_min_ms: float
    wrapped_min_ms: float
    steps: int
    repeats: int
    warmup: int
    batch: int
    model: str
    wrapped_layers: int
    slots_per_layer: int
    torch: str
    device: str
    threads: int
    python: str


def build_arms(arch: str, device: torch.device, per_layer: int) -> tuple[Arm, Arm, int]:
    """The plain zoo model and a wrapped deepcopy of it (all slots dormant), each with its own AdamW."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="cnn", channels=[8, 16]) if arch == "cnn" else ModelConfig(arch="mlp", widths=[64, 64])
    plain = build_model(cfg, INPUT_SHAPE, NUM_CLASSES)
    wrapped = copy.deepcopy(plain)
    # type:Conv2d matches nothing in an MLP, and wrap() rightly refuses a pattern that matches nothing.
    targets = ["type:Conv2d", "type:Linear"] if arch == "cnn" else ["type:Linear"]
    manager = wrap(wrapped, targets=targets, per_layer=per_layer)
    slots = sum(len(layer.slots) for layer in manager.layers.values())
    if manager.counts()["dormant"] != slots:
        raise RuntimeError("a freshly wrapped model has a non-dormant slot")
    plain.to(device).train()
    wrapped.to(device).train()
    arms = (Arm("plain", plain, torch.optim.AdamW(plain.parameters(), lr=1e-3)),
            Arm("wrapped", wrapped, torch.optim.AdamW(wrapped.parameters(), lr=1e-3)))
    return arms[0], arms[1], len(manager.layers)


def check_same_function(plain: nn.Module, wrapped: nn.Module, x: torch.Tensor) -> None:
    """A dormant wrapper must compute exactly what the host computes, or the timing compares two models."""
    plain.eval()
    wrapped.eval()
    with torch.no_grad():
        same = torch.equal(plain(x), wrapped(x))
    plain.train()
    wrapped.train()
    if not same:
        raise RuntimeError("wrapped model with dormant seeds does not match the plain model bit for bit")


def make_step(arm: Arm, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[int], None]:
    model, optimizer = arm.model, arm.optimizer

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def time_block(step: Callable[[int], None], steps: int, device: torch.device) -> list[float]:
    """Seconds taken by each of ``steps`` consecutive steps."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.perf_counter
    times = []
    sync()
    for i in range(steps):
        started = clock()
        step(i)
        sync()
        times.append(clock() - started)
    return times


def measure(arch: str, device: torch.device, steps: int, repeats: int, warmup: int, per_layer: int) -> Outcome:
    plain, wrapped, layers = build_arms(arch, device, per_layer)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(BATCH, *INPUT_SHAPE, generator=generator).to(device),
                torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator).to(device)) for _ in range(POOL)]
    check_same_function(plain.model, wrapped.model, batches[0][0])
    run = {arm.name: make_step(arm, batches) for arm in (plain, wrapped)}
    for name in ("plain", "wrapped", "plain", "wrapped"):
        time_block(run[name], max(1, warmup // 2), device)

    samples: dict[str, list[float]] = {"plain": [], "wrapped": []}
    pair_ratios: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection landing in one arm's block would be charged to that arm
    try:
        for r in range(repeats):
            order = ("plain", "wrapped") if r % 2 == 0 else ("wrapped", "plain")
            pair = {name: time_block(run[name], steps, device) for name in order}
            for name, times in pair.items():
                samples[name].extend(times)
            pair_ratios.append(statistics.fmean(pair["wrapped"]) / statistics.fmean(pair["plain"]))
    finally:
        if gc_was_enabled:
            gc.enable()

    median = {name: statistics.median(times) * 1e3 for name, times in samples.items()}
    return Outcome(
        dormant_overhead_ratio=median["wrapped"] / median["plain"],
        paired_block_ratio=statistics.median(pair_ratios),
        plain_median_ms=median["plain"], wrapped_median_ms=median["wrapped"],
        plain_min_ms=min(samples["plain"]) * 1e3, wrapped_min_ms=min(samples["wrapped"]) * 1e3,
        steps=steps, repeats=repeats, warmup=warmup, batch=BATCH, model=arch, wrapped_layers=layers,
        slots_per_layer=per_layer, torch=torch.__version__, device=_device_name(device),
        threads=torch.get_num_threads(), python=platform.python_version(),
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()})"


def report(o: Outcome) -> str:
    rows = [("arm", "median ms/step", "min ms/step"),
            ("plain", f"{o.plain_median_ms:.3f}", f"{o.plain_min_ms:.3f}"),
            ("wrapped", f"{o.wrapped_median_ms:.3f}", f"{o.wrapped_min_ms:.3f}")]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"dormant Kasmina overhead: {o.model}, {o.wrapped_layers} layers x {o.slots_per_layer} dormant slots, "
             f"batch {o.batch}, AdamW, {o.device}, torch {o.torch}, {o.threads} threads",
             f"{o.repeats} block pairs of {o.steps} steps (ABBA order) after {o.warmup} warm-up steps per arm; "
             f"each step timed, ratio of median step times", ""]
    lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in rows]
    lines += ["", f"median of paired block ratios (cross-check): {o.paired_block_ratio:.3f}",
              f"dormant_overhead_ratio {o.dormant_overhead_ratio:.3f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    parser.add_argument("--steps", type=int, default=50, help="training steps per timed block (default 50)")
    parser.add_argument("--repeats", type=int, default=20, help="timed block pairs (default 20)")
    parser.add_argument("--warmup", type=int, default=40, help="untimed steps per arm before timing (default 40)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
    parser.add_argument("--per-layer", type=int, default=2, help="dormant seed slots per wrapped layer (default 2)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.per_layer < 1:
        parser.error("--steps, --repeats and --per-layer must be at least 1, --warmup at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    outcome = measure(args.model, torch.device(args.device), args.steps, args.repeats, args.warmup, args.per_layer)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(outcome), indent=2) + "\n", encoding="utf-8")
    print(report(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
