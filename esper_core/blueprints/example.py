"""A blueprint resolved on an example host layer: the sizes, parameters and FLOPs a seed of it would
have there. Shown by ``esper blueprints`` and in docs/blueprints.md; computed with the same resolver
and analytic cost model the compiler uses, never by building a module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from esper_core.blueprints.resolve import resolve
from esper_core.blueprints.host import HostSpec
from esper_core.blueprints.ir import Blueprint
from esper_core.compiler.flops import analytic_cost

EXAMPLE_HOSTS = {"linear": (64, 32), "conv1d": (16, 32), "conv2d": (16, 32)}
"""Default example host sizes (in, out) per host kind; conv hosts are 3 (x3) wide, stride 1, padding 1.
A span blueprint's example is a pair of such layers: ``in`` of the first, ``out`` of the second."""
EXAMPLE_GRID = {"conv1d": (16,), "conv2d": (8, 8)}
DEFAULT_RANK = 8


@dataclass(frozen=True)
class Example:
    """One blueprint resolved on an example host: what ``show`` prints and ``--json`` returns."""

    name: str
    host: str
    host_label: str
    rank: int
    dims: dict[str, int]
    ops: list[dict[str, Any]]
    params: int
    flops_forward: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve_example(blueprint: Blueprint, in_size: int | None = None, out_size: int | None = None,
                    rank: int = DEFAULT_RANK) -> Example:
    """Resolve ``blueprint`` on its example host (sizes overridable) and cost it per sample; raises
    :class:`~esper_core.blueprints.builder.ResolveError` when it does not fit that host."""

    default_in, default_out = EXAMPLE_HOSTS[blueprint.host]
    width_in, width_out = in_size or default_in, out_size or default_out
    if blueprint.host == "linear":
        host, sample, label = HostSpec("linear", width_in, width_out), (width_in,), f"Linear({width_in}, {width_out})"
    else:
        grid = EXAMPLE_GRID[blueprint.host]
        n = len(grid)
        host = HostSpec(blueprint.host, width_in, width_out, (3,) * n, (1,) * n, (1,) * n, (1,) * n)
        sample = (width_in, *grid)
        kernel = "x".join(["3"] * n)
        label = (f"{'Conv1d' if n == 1 else 'Conv2d'}({width_in}, {width_out}, {kernel}, stride 1, padding 1) "
                 f"on {'x'.join(map(str, grid))}")
    if blueprint.kind == "span":
        label = f"a pair of layers, {width_in} inputs to the first and {width_out} outputs of the second ({label})"
    resolved = resolve(blueprint, host, rank)
    cost = analytic_cost(resolved, sample)
    ops = []
    for op, op_cost in zip(resolved.ops, cost.ops):
        sized = op.kind in ("linear", "conv1d", "conv2d", "se_gate")
        spatial = op.kind in ("conv1d", "conv2d", "avg_pool")
        ops.append({"index": op_cost.index, "op": op.kind, "in": op.in_size if sized else None,
                    # an SE gate maps its channels to themselves; its out_size is the gate's hidden width
                    "out": (op.in_size if op.kind == "se_gate" else op.out_size) if sized else None,
                    "kernel": "x".join(map(str, op.kernel)) if spatial else None,
                    "stride": "x".join(map(str, op.stride)) if spatial else None,
                    "params": op_cost.params, "flops_forward": op_cost.forward})
    dims = {k: v for k, v in resolved.dims.items()}
    return Example(blueprint.name, blueprint.host, label, rank, dims, ops, cost.params, cost.forward)
