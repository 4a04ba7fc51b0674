"""Kernel compile latency: cold compiles in the CompileService's worker, and warm store hits.

    python benchmarks/compile.py [--json PATH] [--repeats N]

For every builtin blueprint, ``--repeats`` distinct targets (distinct addresses, so every one is a
real miss) are requested from a :class:`CompileService` whose worker has already started and
compiled once; each cold figure is the wall time from ``request`` to the kernel in hand (build,
validate, export, characterise, package, IPC, verify, store). Then each is requested again: a store
hit (read, verify every hash, parse the manifest). The baseline, measured in the same process, is
what the trainer did before kernels existed: build the seed eagerly with the builder. Printed:
one row per blueprint, then the key figures, last. ``--json`` also writes them (``cold_p50_s``,
``hit_p50_ms``, ...). Targets from the issue: cold p50 <= 0.3 s on CPU, hit <= 5 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from esper_core.blueprints.host import HostSpec
from esper_core.blueprints.library import BUILTIN_DIR, load_blueprint
from esper_core.compiler.kernels import KernelSpec, build_kernel
from esper_core.compiler.service import CompileService
from esper_core.compiler.store import LocalKernelStore


def targets(kind: str, repeats: int) -> list[tuple[HostSpec, tuple[int, ...]]]:
    """Distinct targets of the sizes the bundled recipes use (8-64 wide)."""
    if kind == "linear":
        return [(HostSpec("linear", 64, 32 + i), (64,)) for i in range(repeats)]
    return [(HostSpec("conv2d", 16, 32 + i, (3, 3), (2, 2), (1, 1)), (16, 8, 8)) for i in range(repeats)]


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="Also write the figures to this JSON file.")
    parser.add_argument("--repeats", type=int, default=5, help="Cold compiles per blueprint (default 5).")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="Device class the kernels are validated and timed on (default cpu).")
    args = parser.parse_args()

    blueprints = {p.stem: load_blueprint(p).blueprint for p in sorted(BUILTIN_DIR.glob("*.yaml"))}
    rows: dict[str, dict[str, float]] = {}
    cold_all: list[float] = []
    hit_all: list[float] = []
    with tempfile.TemporaryDirectory() as root:
        store = LocalKernelStore(root)
        with CompileService(store, workers=1) as service:
            warm = KernelSpec(blueprints["lowrank_adapter"], HostSpec("linear", 3, 3), 2, device=args.device)
            start_up, _ = timed(lambda: service.request(warm).result())
            for name, blueprint in blueprints.items():
                specs = [KernelSpec(blueprint, host, 8, device=args.device, input_shape=shape)
                         for host, shape in targets(blueprint.host, args.repeats)]
                build = [timed(lambda s=s: build_kernel(s))[0] for s in specs]
                cold = [timed(lambda s=s: service.request(s).result())[0] for s in specs]
                hit = [timed(lambda s=s: service.request(s).result())[0] for s in specs]
                kernel = store.get(specs[0].address())
                instantiate = [timed(lambda k=kernel: k.instantiate(args.device))[0] for _ in specs]
                rows[name] = {"cold_p50_s": statistics.median(cold), "hit_p50_ms": 1e3 * statistics.median(hit),
                              "eager_build_p50_ms": 1e3 * statistics.median(build),
                              "instantiate_p50_ms": 1e3 * statistics.median(instantiate)}
                cold_all += cold
                hit_all += hit
            stats = service.stats

    build_p50 = statistics.median(r["eager_build_p50_ms"] for r in rows.values())
    figures = {
        "cold_p50_s": statistics.median(cold_all),
        "cold_max_s": max(cold_all),
        "hit_p50_ms": 1e3 * statistics.median(hit_all),
        "eager_build_p50_ms": build_p50,
        "cold_over_eager_build": statistics.median(cold_all) / (build_p50 / 1e3),
        "hit_over_eager_build": statistics.median(hit_all) / (build_p50 / 1e3),
        "worker_start_s": start_up,
        "repeats": args.repeats,
        "device": args.device,
        "per_blueprint": rows,
        "service": {"hits": stats.hits, "compiled": stats.compiled, "failed": stats.failed},
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
    }
    print(f"{'blueprint':<18}{'cold p50 s':>12}{'hit p50 ms':>12}{'eager build ms':>16}{'instantiate ms':>16}")
    for name, row in rows.items():
        print(f"{name:<18}{row['cold_p50_s']:>12.3f}{row['hit_p50_ms']:>12.2f}{row['eager_build_p50_ms']:>16.2f}"
              f"{row['instantiate_p50_ms']:>16.2f}")
    print(f"worker start-up and first compile: {start_up:.1f} s (paid once, before the first miss); "
          f"{figures['cpus']} CPUs, 1-min load average {figures['load_average_1min']:.1f}")
    print(f"ratios to an eager build in this process ({build_p50:.2f} ms): "
          f"cold x{figures['cold_over_eager_build']:.0f}, hit x{figures['hit_over_eager_build']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"{args.device}: cold compile p50 {figures['cold_p50_s']:.3f} s (target <= 0.3 s on CPU), "
          f"store hit p50 {figures['hit_p50_ms']:.2f} ms (target <= 5 ms)")


if __name__ == "__main__":
    sys.exit(main())
