"""Validators of a built seed module. Each is a plain function returning one :class:`Check`.

They run in the compiler, never in the training loop, and each one guards a property the trainer
relies on without re-checking: the seed's output can be added to the host's (shape), it cannot
poison the model (finite values), germinating it is invisible (function preservation), and the
figures in the manifest are the real ones (parameter count).

Gradient flow and the exported program are checked in :mod:`.gradients` and :mod:`.export`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from esper_core.compiler.checks import Check
from esper_core.compiler.flops import Cost
from esper_core.compiler.kernels import KernelSpec
from esper_core.compiler.probes import device_of, generator, random_input, stress_inputs
from esper_core.seeds.kasmina import KasminaLayer

SHAPE_BATCHES = (1, 3, 8)
STRESS_BATCH = 4


def check_param_count(module: nn.Module, cost: Cost) -> Check:
    """The built module has exactly the analytic parameter count the budget was checked against."""
    built = sum(p.numel() for p in module.parameters())
    return Check("params", built == cost.params, f"built {built:,} parameters, analytic count {cost.params:,}", "ops")


@torch.no_grad()
def check_output_shape(module: nn.Module, spec: KernelSpec) -> Check:
    """Output shape equals the host's for several batch sizes (so ``f(x) + g(x)`` broadcasts nowhere)."""
    gen = generator(1)
    for batch in SHAPE_BATCHES:
        got = tuple(module.eval()(random_input(spec, batch, gen)).shape)
        expected = (batch, *spec.output_shape)
        if got != expected:
            return Check("output_shape", False, f"batch {batch}: output shape {got}, the host's is {expected}", "ops")
    return Check("output_shape", True, f"{spec.output_shape} per sample at batch sizes {list(SHAPE_BATCHES)}")


@torch.no_grad()
def check_finite(module: nn.Module, spec: KernelSpec, name: str = "finite", when: str = "at init") -> Check:
    """Outputs are finite on ordinary and extreme inputs; a failure names the first op that overflows."""
    for label, x in stress_inputs(spec, STRESS_BATCH, generator(2)):
        out = module.eval()(x)
        if not torch.isfinite(out).all():
            bad = int((~torch.isfinite(out)).sum())
            return Check(name, False, f"{bad} non-finite output values {when} on {label} inputs",
                         first_non_finite_op(module, x))
    return Check(name, True, f"finite {when} on random, extreme and zero inputs")


@torch.no_grad()
def check_zero_at_init(module: nn.Module, spec: KernelSpec) -> Check:
    """The branch outputs exactly zero at init.

    A KasminaLayer would hide a non-zero branch during incubation anyway (its forward adds
    ``g(x) * alpha`` with ``alpha = 0``), so this is a deliberate policy, not a consequence of the
    wrapper: with a zero branch the seed's contribution is exactly zero at *every* alpha until it has
    learned something, so blending an under-trained seed, merging a fossil, or any code path that adds
    the branch directly never perturbs the host with random init noise.
    """
    out = module.eval()(random_input(spec, STRESS_BATCH, generator(3)))
    if torch.count_nonzero(out) == 0:
        return Check("zero_at_init", True, "the branch outputs exactly zero at init")
    return Check("zero_at_init", False, f"the branch outputs max |g(x)| = {out.abs().max().item():.3g} at init, so "
                 "it is not function-preserving once blended; initialise its last linear/conv op with "
                 "`init: zeros`", _last_weighted_op(spec))


@torch.no_grad()
def check_germination(module: nn.Module, spec: KernelSpec) -> Check:
    """Germinating the kernel beside a real host layer leaves the layer's outputs bit-identical, and
    the branch stays finite on the same inputs.

    Wraps a host ``nn.Linear``/``nn.Conv2d`` of the target's geometry in a KasminaLayer, germinates a
    copy of the kernel and starts its incubation (the moment it joins the forward pass), and compares
    outputs with ``torch.equal`` on ordinary and extreme inputs. Incubation adds nothing to the forward
    pass whatever the branch computes, so a branch that overflows on extreme inputs is caught by its
    own output: blended in, it would turn the host layer's output non-finite.
    """
    host = _host_layer(spec)
    layer = KasminaLayer(host, slots=1, eta=1.0).eval()
    inputs = stress_inputs(spec, STRESS_BATCH, generator(4))
    before = [layer(x) for _, x in inputs]
    layer.germinate(0, spec.blueprint.name, spec.address(), params=0, step=0)
    layer.start_incubation(0, copy.deepcopy(module))
    for (label, x), expected in zip(inputs, before):
        if not torch.equal(layer(x), expected):
            return Check("germination", False, f"germinating the seed changed the host layer's output on "
                         f"{label} inputs", first_non_finite_op(module, x) or "ops")
        if not torch.isfinite(layer.seed_module(0)(x)).all():
            return Check("germination", False, f"the seed's output is not finite on {label} inputs: blended "
                         f"in, it would have changed the host layer's output to non-finite values",
                         first_non_finite_op(module, x) or "ops")
    return Check("germination", True, "host outputs bit-identical after germinate + start_incubation, and the "
                 "seed's output finite on every probe input")


@torch.no_grad()
def first_non_finite_op(module: nn.Module, x: torch.Tensor) -> str | None:
    """``ops.<i>`` of the first op of a sequential branch whose output is not finite on ``x``."""
    if not isinstance(module, nn.Sequential):
        return None
    for index, op in enumerate(module):
        x = op(x)
        if not torch.isfinite(x).all():
            return f"ops.{index}"
    return None


def _host_layer(spec: KernelSpec) -> nn.Module:
    """A host layer of the target's geometry with seeded weights (on the target's device and dtype)."""
    host = spec.host
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        if host.kind == "linear":
            layer: nn.Module = nn.Linear(host.in_features, host.out_features)
        else:
            conv = nn.Conv1d if host.kind == "conv1d" else nn.Conv2d
            layer = conv(host.in_features, host.out_features, host.kernel, host.stride, host.padding, host.dilation)
    return layer.to(device=device_of(spec), dtype=spec.torch_dtype)


def _last_weighted_op(spec: KernelSpec) -> str:
    weighted = [i for i, op in enumerate(spec.blueprint.ops) if op.op in ("linear", "conv1d", "conv2d")]
    return f"ops.{weighted[-1]}.init" if weighted else "ops"
