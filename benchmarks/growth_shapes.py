"""Growth against its own final shape: does growing pay beyond the architecture it ends with?

    python benchmarks/growth_shapes.py --growth benchmarks/results/growth-v2.json [--tasks mnist1d,teacher]
                                       [--seeds 0-9] [--jobs N] [--cache DIR] [--json PATH]

For every MLP-host G-esper run of a ``benchmarks/growth.py`` result file, this trains ``S-shape``:
that run's final architecture as a static model from step 0. A fossilized span seed in the slot of
host layer j adds k hidden units to the hidden layer before it: they read layer j-1's input and add to
layer j's output, and units added to consecutive hidden layers are not connected to each other
(:class:`SpanMLP` builds exactly that, with one output bias per layer where G-esper has one per seed).
Each S-shape run is ``esper train`` of the same recipe, task, seed and training as every growth.py arm,
with ``policy.max_seeds=0`` and the model from this module's factory, so the data, split and batch
order are the G-esper run's.

Two paired differences per task (test accuracy in points, paired-t and bootstrap 95% intervals):
``G-esper - S-shape``, what growing adds beyond the shape it ends with, and ``S-shape - S-budget``,
what that shape is worth against a dense MLP of the same parameter count. A supplementary figure with
no issue target: it says where a gap between G-esper and a static arm comes from. The key figure
(the first task's ``G-esper - S-shape``) is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import growth

SHAPE = "S-shape"


class SpanMLP(nn.Module):
    """The zoo MLP's layers (``layers.*`` and ``head``: what growth.py's recipe wraps), plus ``added[i]``
    units in hidden layer i that read layer i's input and add to layer i+1's output (pre-activation)."""

    def __init__(self, inputs: int, widths: list[int], added: list[int], outputs: int) -> None:
        super().__init__()
        sizes = [inputs, *widths]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.head = nn.Linear(widths[-1], outputs)
        outs = [*widths[1:], outputs]
        self.spans = nn.ModuleList(
            nn.Sequential(nn.Linear(sizes[i], k), nn.ReLU(), nn.Linear(k, outs[i], bias=False)) if k else nn.Identity()
            for i, k in enumerate(added))
        self.added = list(added)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        hosts = [*self.layers, self.head]
        previous: torch.Tensor | None = None  # the input of the layer before
        for i, layer in enumerate(hosts):
            y = layer(x)
            if i > 0 and self.added[i - 1]:
                y = y + self.spans[i - 1](previous)
            previous, x = x, (torch.relu(y) if i < len(self.layers) else y)
        return x


def span_mlp(input_shape: tuple[int, ...], num_classes: int, widths: list[int], added: list[int]) -> nn.Module:
    """``model.factory`` for the S-shape arm (``growth_shapes:span_mlp``)."""
    return SpanMLP(math.prod(input_shape), list(widths), list(added), num_classes)


def added_units(record: dict[str, Any]) -> list[int]:
    """Units each hidden layer of a G-esper run's MLP gained from its fossilized span seeds (from each
    seed's parameter count: k * (inputs + 1) + k * outputs + outputs)."""
    sizes = [record["inputs"], *record["widths"], record["outputs"]]
    names = [*(f"layers.{i}" for i in range(len(record["widths"]))), "head"]
    added = [0] * len(record["widths"])
    for seed in record["fossilized"]:
        j = names.index(seed["layer"])
        units, rest = divmod(seed["params"] - sizes[j + 1], sizes[j - 1] + 1 + sizes[j + 1])
        if seed["blueprint"] != "span_linear" or j == 0 or rest or units <= 0:
            raise ValueError(f"{seed} is not a span_linear seed of this MLP")
        added[j - 1] += units
    return added


@dataclass(frozen=True)
class ShapeJob(growth.Job):
    """A growth.py job whose model is :class:`SpanMLP` with ``added`` units per hidden layer."""

    added: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return f"{super().name}-{'-'.join(map(str, self.added))}"

    def overrides(self, training: growth.Training) -> list[str]:
        kwargs = f"{{widths: [{','.join(map(str, self.widths))}], added: [{','.join(map(str, self.added))}]}}"
        return [*super().overrides(training), "model.arch=factory", "model.factory=growth_shapes:span_mlp",
                f"model.factory_kwargs={kwargs}"]


def shape_macs(record: dict[str, Any], added: list[int]) -> int:
    """Forward multiply-adds per sample of the S-shape model."""
    sizes = [record["inputs"], *record["widths"], record["outputs"]]
    return growth.mlp_macs(sizes) + sum(k * (sizes[i] + sizes[i + 2]) for i, k in enumerate(added))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--growth", type=Path, required=True, help="a benchmarks/growth.py --json result file")
    parser.add_argument("--tasks", default="mnist1d,teacher", help="comma-separated tasks of that file")
    parser.add_argument("--seeds", type=growth.parse_seeds, help="run seeds (default: every seed of the file)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one run each (default 1)")
    parser.add_argument("--cache", type=Path, default=growth.REPO / "runs" / "growth-shapes",
                        help="run directories and cached run records (default %(default)s)")
    parser.add_argument("--json", type=Path, help="write every figure and every run's record here")
    args = parser.parse_args()
    try:
        source = json.loads(args.growth.read_text(encoding="utf-8"))
        runs = [r for r in source["runs"] if r["host"] == "mlp" and r["task"] in args.tasks.split(",")
                and (args.seeds is None or r["seed"] in args.seeds)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        parser.error(f"{args.growth}: not a growth.py result file ({exc})")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    training = growth.Training(**source["training"])
    recipe = Path(source["recipe"]) if Path(source["recipe"]).is_file() else growth.RECIPE
    grown = [r for r in runs if r["arm"] == "G-esper"]
    if not grown:
        parser.error(f"{args.growth} has no MLP-host G-esper run for tasks {args.tasks}")
    jobs = {ShapeJob(r["task"], r["host"], SHAPE, r["seed"], tuple(r["widths"]), tuple(added_units(r))): r
            for r in grown}
    started = time.perf_counter()
    code_key = growth.code_fingerprint()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {job: pool.submit(growth.run_job, job, training, recipe, args.cache.resolve(), code_key)
                   for job in jobs}
        shapes = []
        for job, future in futures.items():
            record = future.result()
            macs = shape_macs(record, list(job.added))
            record |= {"added": list(job.added), "host_macs": macs,
                       "flops": 6 * training.batch * training.steps * macs}
            shapes.append(record)
            print(f"{job.name}: test acc {100 * record['test_accuracy']:.2f}%, params {record['params']:,}", flush=True)
    summary: dict[str, Any] = {}
    for task in dict.fromkeys(r["task"] for r in grown):
        acc = {arm: {r["seed"]: 100 * r["test_accuracy"] for r in [*runs, *shapes]
                     if r["task"] == task and r["arm"] == arm} for arm in (*growth.ARMS, SHAPE)}
        summary[task] = {
            "accuracy": {arm: float(np.mean(list(v.values()))) for arm, v in acc.items() if v},
            "params": {arm: float(np.mean([r["params"] for r in [*runs, *shapes] if r["task"] == task
                                           and r["arm"] == arm])) for arm, v in acc.items() if v},
            "G-esper - S-shape": growth.paired(acc["G-esper"], acc[SHAPE]),
            "S-shape - S-budget": growth.paired(acc[SHAPE], acc["S-budget"]) if acc["S-budget"] else None}
    wall = time.perf_counter() - started
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "growth-shapes", "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
            "growth": str(args.growth), "training": source["training"], "wall_s": round(wall, 1),
            "summary": summary, "runs": shapes}, indent=1) + "\n", encoding="utf-8")
    for task, entry in summary.items():
        print(f"\n{task}, MLP host: " + ", ".join(f"{arm} {a:.2f}% ({entry['params'][arm]:,.0f} params)"
                                                 for arm, a in entry["accuracy"].items()))
        for name in ("G-esper - S-shape", "S-shape - S-budget"):
            if entry[name]:
                print(f"  {name:<20} {growth._fmt_diff(entry[name])}")
    first = next(iter(summary))
    print(f"\nkey figure: {first}/mlp G-esper - S-shape test accuracy "
          f"{growth._fmt_diff(summary[first]['G-esper - S-shape'])} points")


if __name__ == "__main__":
    main()
