"""The input shape each wrapped layer really sees, from one forward pass on a real example.

Kernels are compiled for a host layer *and* the input it receives (a Linear inside a transformer
sees (tokens, features); a convolution sees a feature map whose size only the forward pass knows).
Probing with a real example, not zeros of an assumed dtype, means integer token ids reach an
embedding as integers and dict inputs reach the model as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esper_core.blueprints.host import HostSpec


def check_module(model: object, said: str) -> None:
    """Refuse a model that is not a module where it is given, naming the argument (it failed deep
    inside Esper's code with an ``AttributeError``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{said}: a torch.nn.Module, not {type(model).__name__}")


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)`` for a tensor, ``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a dict."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def shapes_of(value: Any) -> str:
    """The shapes of the tensors in ``value`` (a tensor, or a tuple, list or dict of them) for a message
    about an example input that a model could not run."""
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key!r}: {shapes_of(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(shapes_of(item) for item in value) + ")"
    return type(value).__name__


def to_device(value: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor in a (possibly nested) batch to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device, non_blocking) for v in value)
    return value


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the block (batch norm reads its running statistics, dropout is off),
    and back in the mode it was in afterwards, also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class LayerShapes:
    """What one forward pass showed of the named layers: per-sample input and output shapes, and the
    order in which they were first called (layers never reached are missing from ``order``)."""

    inputs: dict[str, tuple[int, ...]]
    outputs: dict[str, tuple[int, ...]]
    order: list[str]


def probe_layers(model: nn.Module, names: Sequence[str], example: Any) -> LayerShapes:
    """One eval-mode, no-grad forward of ``example`` through the model, watching the named layers.

    The model's mode is restored afterwards and no parameter changes (eval mode: batch norm reads its
    running statistics). A layer the forward pass never reaches gets the default input shape of its kind.
    """
    inputs: dict[str, tuple[int, ...]] = {}
    outputs: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def record(_module: nn.Module, args: tuple, output: Any) -> None:
            inputs.setdefault(name, tuple(args[0].shape[1:]))
            if isinstance(output, torch.Tensor):
                outputs.setdefault(name, tuple(output.shape[1:]))
        return record

    device = next(model.parameters()).device
    hooks = [model.get_submodule(name).register_forward_hook(recorder(name)) for name in names]
    try:
        with torch.no_grad(), eval_mode(model):
            call_model(model, to_device(example, device))
    finally:
        for hook in hooks:
            hook.remove()
    order = list(inputs)
    for name in names:
        inputs.setdefault(name, _host_of(model.get_submodule(name)).default_input_shape())
    return LayerShapes(inputs, outputs, order)


def input_shapes(model: nn.Module, names: Sequence[str], example: Any) -> dict[str, tuple[int, ...]]:
    """Per-sample input shape of each named layer (see :func:`probe_layers`)."""
    return probe_layers(model, names, example).inputs


def _host_of(module: nn.Module) -> HostSpec:
    """The host spec of a plain layer, or of the host inside an already-wrapped Kasmina layer."""
    spec = getattr(module, "spec", None)
    return spec if isinstance(spec, HostSpec) else HostSpec.of(module)
