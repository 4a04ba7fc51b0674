"""Targets: the host shapes a kernel is compiled for.

A :class:`Target` is everything of a :class:`KernelSpec` except the blueprint. Targets come from a
recipe (every distinct host layer the recipe's seeds can grow on, with the input shape that layer
really sees) or from the command line (``--linear IN:OUT``, ``--conv2d IN:OUT:K:S:P[:HxW]``).
Blueprint files cannot carry targets: the IR forbids unknown keys, and the IR is hashed into every
address, so a target list inside it would change the kernels it describes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from esper_core.blueprints.host import HostSpec
from esper_core.blueprints.ir import Blueprint
from esper_core.compiler.kernels import DEFAULT_GRID, KernelSpec
from esper_core.errors import RECIPE_FIELD, ConfigError, Problem
from esper_core.recipe.load import LoadedRecipe
from esper_core.seeds.targets import TargetMismatch, match_targets
from esper_core.training.data import build_data
from esper_core.training.models import build_model

COMMAND_LINE = "command line"
PROBE_BATCH = 2
DEFAULT_RANK = 8
"""``rank`` of command-line targets when neither a recipe nor ``--rank`` gives one."""


@dataclass(frozen=True)
class Target:
    host: HostSpec
    input_shape: tuple[int, ...]
    rank: int = DEFAULT_RANK
    dtype: str = "float32"
    device: str = "cpu"

    def spec(self, blueprint: Blueprint) -> KernelSpec:
        return KernelSpec(blueprint, self.host, self.rank, self.dtype, self.device, self.input_shape)


def device_class(choice: str) -> str:
    """The device class a recipe's ``run.device`` trains on (``auto``: CUDA when present)."""
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


def recipe_targets(loaded: LoadedRecipe) -> list[Target]:
    """Every distinct target of the layers the recipe's seeds wrap, in model order, with the input
    shape each layer sees in a forward pass of the recipe's model."""
    recipe = loaded.recipe
    try:
        data = build_data(recipe.data, recipe.run.seed, loaded.path.parent)
        with torch.random.fork_rng(devices=[]):
            model = build_model(recipe.model, data.input_shape, data.num_classes)
        names = match_targets(model, recipe.seeds.targets, recipe.seeds.exclude)
    except ConfigError as exc:
        raise ConfigError([loaded.locate(p.field, p.message) if p.source == RECIPE_FIELD and p.field else p
                           for p in exc.problems]) from None
    except TargetMismatch as exc:
        raise ConfigError(loaded.locate(f"seeds.targets.{exc.index}", exc.message)) from None
    shapes = layer_input_shapes(model, names, data.input_shape)
    device = device_class(recipe.run.device)
    targets = (Target(HostSpec.of(model.get_submodule(name)), shapes[name], recipe.seeds.rank, "float32", device)
               for name in names)
    return list(dict.fromkeys(targets))


def layer_input_shapes(model: nn.Module, names: list[str], sample_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Per-sample input shape of each named layer, from one forward pass on a zero batch.

    The model is a throwaway copy built only for this (eval mode, no gradients). A layer the forward
    pass never reaches gets the default probe shape of its kind.
    """
    seen: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):  # a pre-hook's return value would replace the layer's inputs: return None
        def record(_module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, tuple(args[0].shape[1:]))
        return record

    hooks = [model.get_submodule(name).register_forward_pre_hook(recorder(name)) for name in names]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((PROBE_BATCH, *sample_shape)))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: seen.get(name) or _default_shape(_host_of(model.get_submodule(name))) for name in names}


def _host_of(module: nn.Module) -> HostSpec:
    """The host spec of a plain layer, or of the host inside an already-wrapped Kasmina layer."""
    spec = getattr(module, "spec", None)
    return spec if isinstance(spec, HostSpec) else HostSpec.of(module)


def _default_shape(host: HostSpec) -> tuple[int, ...]:
    return (host.in_features,) if host.kind == "linear" else (host.in_features, *DEFAULT_GRID)


_INT = r"([1-9]\d*)"
_LINEAR = re.compile(rf"^{_INT}:{_INT}$")
_CONV = re.compile(rf"^{_INT}:{_INT}:{_INT}:{_INT}:(0|{_INT})(?::{_INT}x{_INT})?$")


def parse_linear(text: str, option: str = "--linear") -> Target:
    """``IN:OUT`` -> a Linear target with input shape ``(IN,)``."""
    match = _LINEAR.match(text.strip())
    if match is None:
        raise ConfigError(Problem(COMMAND_LINE, f"{text!r} is not IN:OUT (e.g. 64:32)", field=option))
    n_in, n_out = int(match[1]), int(match[2])
    return Target(HostSpec("linear", n_in, n_out), (n_in,))


def parse_conv2d(text: str, option: str = "--conv2d") -> Target:
    """``IN:OUT:K:S:P[:HxW]`` -> a Conv2d target (square kernel, stride, padding; default grid 8x8)."""
    match = _CONV.match(text.strip())
    if match is None:
        raise ConfigError(Problem(COMMAND_LINE, f"{text!r} is not IN:OUT:KERNEL:STRIDE:PADDING[:HxW] "
                                  "(e.g. 16:32:3:2:1:8x8)", field=option))
    n_in, n_out, k, s, p = (int(match[i]) for i in (1, 2, 3, 4, 5))
    grid = (int(match[7]), int(match[8])) if match[7] else DEFAULT_GRID
    host = HostSpec("conv2d", n_in, n_out, (k, k), (s, s), (p, p))
    if min(host.output_hw(*grid)) < 1:
        raise ConfigError(Problem(COMMAND_LINE, f"{text!r}: a {grid[0]}x{grid[1]} input gives an empty output",
                                  field=option))
    return Target(host, (n_in, *grid))


def with_options(target: Target, rank: int | None = None, dtype: str | None = None,
                 device: str | None = None) -> Target:
    """``target`` with a rank, dtype and device class where given."""
    return replace(target, rank=target.rank if rank is None else rank, dtype=dtype or target.dtype,
                   device=device or target.device)
