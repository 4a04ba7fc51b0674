"""Size checks made on the analytic cost, before the module is built.

Two kinds: hard limits that no kernel may exceed (a blueprint asking for a teraFLOP per sample is a
mistake, whatever the recipe says) and the budget of the recipe or the command line (a kernel the
growth policy could never afford is useless to compile).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from esper_core.compiler.checks import Check
from esper_core.compiler.flops import MAX_ACTIVATION_PER_SAMPLE, MAX_FLOPS_PER_SAMPLE, Cost
from esper_core.compiler.kernels import KernelSpec

MAX_HOST_PARAMS = 2**28


@dataclass(frozen=True)
class Budget:
    """Most parameters and most training FLOPs (forward + backward, per sample) one kernel may have.

    ``params_from`` and ``flops_from`` say where each limit came from, for messages.
    """

    max_params: int | None = None
    max_flops: int | None = None
    params_from: str = "--max-params"
    flops_from: str = "--max-flops"


def check_limits(cost: Cost) -> list[Check]:
    """Hard limits on FLOPs and tensor sizes (parameter and width limits live in the builder)."""
    flops = cost.forward + cost.backward
    costliest = max(cost.ops, key=lambda op: op.forward + op.backward)
    largest = max(cost.ops, key=lambda op: math.prod(op.output_shape))
    input_largest = math.prod(cost.input_shape) >= math.prod(largest.output_shape)
    what = "the input" if input_largest else f"the output of ops.{largest.index}"
    return [
        Check("limits.flops", flops <= MAX_FLOPS_PER_SAMPLE,
              f"{flops:,} training FLOPs per sample (limit {MAX_FLOPS_PER_SAMPLE:,})", f"ops.{costliest.index}"),
        Check("limits.activation", cost.peak_activation <= MAX_ACTIVATION_PER_SAMPLE,
              f"largest tensor {cost.peak_activation:,} elements per sample, {what} "
              f"(limit {MAX_ACTIVATION_PER_SAMPLE:,})", f"ops.{0 if input_largest else largest.index}"),
    ]


def check_host(spec: KernelSpec) -> Check:
    """The germination check allocates a real host layer of the target's geometry: refuse absurd ones."""
    host = spec.host
    params = host.out_features * host.in_features * math.prod(host.kernel if host.kind != "linear" else (1,))
    return Check("limits.host", params <= MAX_HOST_PARAMS, f"the host layer has {params:,} weights "
                 f"(limit {MAX_HOST_PARAMS:,})")


def check_budget(cost: Cost, budget: Budget) -> list[Check]:
    """The budget checks that apply; each failure blames the op that costs the most."""
    checks = []
    if budget.max_params is not None:
        biggest = max(cost.ops, key=lambda op: op.params)
        checks.append(Check("budget.params", cost.params <= budget.max_params,
                            f"{cost.params:,} parameters, budget {budget.max_params:,} ({budget.params_from}); "
                            f"ops.{biggest.index} holds {biggest.params:,}", f"ops.{biggest.index}"))
    if budget.max_flops is not None:
        total = cost.forward + cost.backward
        biggest = max(cost.ops, key=lambda op: op.forward + op.backward)
        checks.append(Check("budget.flops", total <= budget.max_flops,
                            f"{total:,} training FLOPs per sample, budget {budget.max_flops:,} ({budget.flops_from}); "
                            f"ops.{biggest.index} costs {biggest.forward + biggest.backward:,}",
                            f"ops.{biggest.index}"))
    return checks
