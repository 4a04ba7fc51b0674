"""Span seeds as real width: fossilized span seeds folded into the two host layers they span.

A span seed on layer D whose feeder is layer F computes ``B·σ(A·x_F + a) + b`` from F's input ``x_F``
and adds it to D's output: ``k`` new hidden units between F and D. When F and D are ``nn.Linear``
layers (or ``nn.Conv2d`` layers whose geometry the seed's two convolutions share) and ``σ`` is what the
model applies between F and D, that is exactly F with ``k`` more outputs (weight ``[W_F; A]``, bias
``[c_F; a]``) followed by D with ``k`` more inputs (weight ``[W_D, B]``, bias ``c_D + b``): the network
becomes genuinely wider and the branches disappear (issue 12: "a fossilized span seed can be merged
into a genuinely wider pair of host layers"). Rows and columns are appended after the existing ones,
so layers that several pairs widen (a hidden layer's outgoing units and the next one's) compose: a
seed's weights are zero-padded against units added by another pair, which it never read or fed.

What the model applies between F and D cannot be read from its modules (an activation other than the
seed's, a normalisation over F's features, a residual connection reading F's output would all make
the widened model compute something else, or fail). So every pair is tried on a copy and kept only
when the whole model still computes what the branch model computes on an example batch (the export's
held-out inputs); otherwise its seeds stay branches, with the reason recorded.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Check = Callable[[nn.Module], str | None]
"""Compares a candidate model with the reference outputs: ``None`` when equal, else why not."""


def widen_spans(plain: nn.Module, grown_type: type, check: Check) -> tuple[nn.Module, dict[str, str]]:
    """Fold every foldable span pair of ``plain`` (modules of ``grown_type``, i.e. ``GrownLayer``, whose
    branches all read their feeder's input, at scale 1) into wider hosts, one pair at a time, each kept
    only if ``check`` accepts the model. Returns the model and, per destination layer, what happened
    (``"widened: ..."`` or why not)."""
    notes: dict[str, str] = {}
    checked: set[str] = set()  # pairs the check refused: trying them again would give the same answer
    progress = True
    while progress:  # a pair whose feeder still had span branches of its own may fold once those did
        progress = False
        for dest, feeder in _span_pairs(plain, grown_type):
            if dest in checked:
                continue
            reason = _refusal(plain.get_submodule(dest), plain.get_submodule(feeder))
            if reason is not None:
                notes[dest] = reason
                continue
            trial = copy.deepcopy(plain)
            units = _widen(trial, trial.get_submodule(feeder), trial.get_submodule(dest))
            trial = _settled(trial, grown_type)
            problem = check(trial)
            if problem is None:
                plain, progress = trial, True
                notes[dest] = f"widened: {units} units added to {feeder}'s outputs and {dest}'s inputs"
            else:
                checked.add(dest)
                notes[dest] = f"not widened: {problem}"
    return plain, notes


def _span_pairs(model: nn.Module, grown_type: type) -> list[tuple[str, str]]:
    """(destination, feeder) names of the grown layers with span branches."""
    names = {id(m): n for n, m in model.named_modules()}
    return [(name, names[id(m._feeder[0])]) for name, m in model.named_modules()
            if isinstance(m, grown_type) and any(m.spans) and m._feeder]


def _refusal(dest: Any, feeder: Any) -> str | None:
    """Why the pair cannot be widened by construction (``None``: try it)."""
    if not all(dest.spans):
        return "not widened: the layer keeps other seeds as branches, which read its input"
    if any(scale != 1.0 for scale in dest.scales):
        return "not widened: a seed is still blending or in probation"
    if feeder.branches:
        return "not widened: the feeder keeps seeds of its own as branches"
    kind = type(feeder.host)
    if kind not in (nn.Linear, nn.Conv2d) or type(dest.host) is not kind:
        return "not widened: the pair is not two nn.Linear or two nn.Conv2d layers"
    for branch in dest.branches:
        ops = list(branch) if isinstance(branch, nn.Sequential) else []
        if len(ops) != 3 or type(ops[0]) is not kind or type(ops[2]) is not kind or list(ops[1].parameters()):
            return "not widened: a seed is not layer, activation, layer"
        if kind is nn.Conv2d and not (_same_geometry(ops[0], feeder.host) and _same_geometry(ops[2], dest.host)):
            return "not widened: a seed's convolutions do not share the hosts' geometry"
    return None


def _same_geometry(a: nn.Conv2d, b: nn.Conv2d) -> bool:
    return (a.kernel_size, a.stride, a.padding, a.dilation, a.groups, a.padding_mode) == \
        (b.kernel_size, b.stride, b.padding, b.dilation, b.groups, b.padding_mode) and a.groups == 1


@torch.no_grad()
def _widen(model: nn.Module, feeder: Any, dest: Any) -> int:
    """Append every span branch of ``dest`` as outputs of ``feeder.host`` and inputs of ``dest.host``.
    Span branches of a later layer that read ``dest``'s input get zero weights for the new inputs (they
    never read those units)."""
    units = 0
    for branch in dest.branches:
        first, _, second = list(branch)
        _append_outputs(feeder.host, first.weight, first.bias)
        _append_inputs(dest.host, second.weight, second.bias)
        units += first.weight.shape[0]
    readers = [m for m in model.modules() if getattr(m, "_feeder", ()) and m._feeder[0] is dest]
    for reader in readers:
        for branch, span in zip(reader.branches, reader.spans):
            if span:
                _pad_inputs(list(branch)[0], units)
    dest.branches, dest.scales, dest.spans, dest._feeder = nn.ModuleList(), (), (), ()
    feeder.keep_input, feeder.kept = False, None
    return units


def _pad_inputs(layer: nn.Module, extra: int) -> None:
    """``extra`` more inputs with zero weights: the layer computes what it did on the inputs it had."""
    old = layer.weight
    zeros = torch.zeros((old.shape[0], extra, *old.shape[2:]), dtype=old.dtype, device=old.device)
    layer.weight = nn.Parameter(torch.cat([old, zeros], dim=1))
    _resize(layer)


def _append_outputs(host: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """New output units of ``host``: rows of ``weight`` (padded with zeros for inputs added to the host
    after the seed was built) and ``bias`` (zeros where absent)."""
    old = host.weight
    rows = torch.zeros((weight.shape[0], *old.shape[1:]), dtype=old.dtype, device=old.device)
    rows[:, :weight.shape[1]] = weight.to(old.dtype)
    host.weight = nn.Parameter(torch.cat([old, rows]))
    if host.bias is not None or (bias is not None and bool(torch.any(bias != 0))):
        before = host.bias if host.bias is not None else torch.zeros(old.shape[0], dtype=old.dtype, device=old.device)
        added = bias.to(old.dtype) if bias is not None else torch.zeros(weight.shape[0], dtype=old.dtype,
                                                                         device=old.device)
        host.bias = nn.Parameter(torch.cat([before, added]))
    _resize(host)


def _append_inputs(host: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """New input units of ``host``: columns of ``weight`` (padded with zeros for outputs added to the
    host after the seed was built); the seed's ``bias`` adds to the host's."""
    old = host.weight
    columns = torch.zeros((old.shape[0], weight.shape[1], *old.shape[2:]), dtype=old.dtype, device=old.device)
    columns[:weight.shape[0]] = weight.to(old.dtype)
    host.weight = nn.Parameter(torch.cat([old, columns], dim=1))
    if bias is not None and bool(torch.any(bias != 0)):
        total = host.bias.detach().clone() if host.bias is not None else \
            torch.zeros(old.shape[0], dtype=old.dtype, device=old.device)
        total[:bias.shape[0]] += bias.to(old.dtype)
        host.bias = nn.Parameter(total)
    _resize(host)


def _resize(host: nn.Module) -> None:
    """Keep the layer's size attributes true to its weight (printing, export and rebuilding read them)."""
    out, inp = host.weight.shape[:2]
    if isinstance(host, nn.Linear):
        host.in_features, host.out_features = inp, out
    else:
        host.in_channels, host.out_channels = inp, out


def _settled(model: nn.Module, grown_type: type) -> nn.Module:
    """``model`` with every grown layer that has no branch left and hands no input on replaced by its host."""
    for name, module in list(model.named_modules()):
        if isinstance(module, grown_type) and not module.branches and not module.keep_input:
            parent, _, child = name.rpartition(".")
            if not name:
                return module.host
            setattr(model.get_submodule(parent) if parent else model, child, module.host)
    return model
