"""From a grown model to a plain one: Kasmina wrappers out, mergeable seeds folded into their hosts.

:func:`unwrap` (Esper's ``merge_and_unload``) copies the model and replaces each Kasmina layer with:

- its host alone, when no seed contributes to the output or every contributing seed was merged
  (a fossilized seed that is an exact linear map of the host's input, :mod:`esper_core.seeds.merge`);
  the model then has its original module names, so its state dict loads into the user's own class,
  unless a merged biased seed gave a host built without a bias one (or widening resized a layer):
  :func:`changed_layers` names such layers, so an export can say so instead of leaving a strict load
  to fail with an unexplained ``Unexpected key(s)``;
- otherwise a :class:`GrownLayer` ``y = host(x) + sum_i scale_i * branch_i(x)`` holding the host and
  the remaining seeds as plain submodules (``host.*``, ``branches.N.*``). A span seed (new units
  between two layers) is a branch of the second layer that reads the first layer's input; the first
  layer becomes a GrownLayer too (it keeps its input for the pass).

Slot bookkeeping, ``alpha`` buffers, dormant, germinated and culled slots disappear.
Live seeds: an incubating seed (TRAINING) contributes exactly nothing to the output and is left out;
a blending or probation seed is kept as a branch scaled by its current ``alpha`` (never merged, even
when it could be: it was not kept yet), so the export computes what the trained model computes, and
each such seed is reported (``esper export`` warns). With ``merge=False`` fossilized seeds stay
branches too.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from esper_core.errors import ConfigError, Problem, one_line
from esper_core.seeds.kasmina import KasminaLayer
from esper_core.seeds.lifecycle import SeedState
from esper_core.seeds.merge import merge_into
from esper_core.seeds.probe import call_model, check_module, shapes_of, to_device

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}
"""Largest accepted ``max |plain - grown|`` per unit of output scale, by the model's dtype. bf16
keeps 8 significant bits (a relative step of 2**-8 = 0.4%), and merging re-rounds each merged weight
once, so a bf16 model is held to 2e-2; float16 (11 bits) to 2e-3."""


class GrownLayer(nn.Module):
    """A host layer plus the seeds that were not merged into it: ``host(x) + sum_i scale_i * branch_i(x_i)``,
    where ``x_i`` is this layer's input, or for a span seed the input of the layer before (its feeder,
    which keeps its input for the pass). Scales are Python floats (1.0 for fossilized seeds), so an
    exported program holds them as constants."""

    def __init__(self, host: nn.Module, branches: list[nn.Module], scales: list[float],
                 spans: list[bool] | None = None) -> None:
        super().__init__()
        self.host = host
        self.branches = nn.ModuleList(branches)
        self.scales = tuple(float(s) for s in scales)
        self.spans = tuple(spans or [False] * len(branches))
        self.keep_input = False  # set on the feeder of a span branch
        self.kept: torch.Tensor | None = None
        self._feeder: tuple[GrownLayer, ...] = ()  # a tuple, so the feeder is not registered as a child

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep_input:
            self.kept = x
        y = self.host(x)
        for branch, scale, span in zip(self.branches, self.scales, self.spans):
            out = branch(self._feeder[0].kept if span else x)
            y = y + (out if scale == 1.0 else out * scale)
        return y


SeedAction = Literal["widened", "merged", "branch", "dropped"]
"""What an export does with a seed: fold a span seed's units into wider hosts, fold a linear seed into
its host's weight, keep it as a branch, or leave it out (it contributes nothing yet)."""


@dataclass(frozen=True)
class SeedOutcome:
    """What :func:`unwrap` did with one seed (a :data:`SeedAction`) and why."""

    layer: str
    slot: int
    blueprint: str | None
    state: str
    alpha: float
    params: int
    action: SeedAction
    reason: str
    ir: dict[str, Any] | None
    target: dict[str, Any] | None
    source: str | None = None  # a span seed's feeder layer (the input it reads)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def unwrap(model: nn.Module, merge: bool = True, example: Any = None) -> tuple[nn.Module, list[SeedOutcome]]:
    """A plain copy of ``model`` (see the module docstring) and what happened to each seed; ``model``
    itself is not changed. With ``merge`` and ``example`` (model inputs: a tensor, a tuple or a dict),
    fossilized span seeds are folded into genuinely wider host layers wherever the wider model computes
    what the grown one does on ``example`` (:mod:`esper_core.export.widen`)."""
    check_module(model, "unwrap(model)")
    plain = copy.deepcopy(model)
    outcomes: list[SeedOutcome] = []
    layers = {name: m for name, m in plain.named_modules() if isinstance(m, KasminaLayer)}
    kept: dict[str, tuple[list[nn.Module], list[float], list[bool]]] = {}
    feeders: dict[str, str] = {}  # layer with a span branch -> the layer whose input it reads
    for name, layer in layers.items():
        branches, scales, spans = kept.setdefault(name, ([], [], []))
        for index, slot in enumerate(layer.slots):
            if slot.merged:  # folded into the host's weight when it fossilized: nothing left to decide
                spec = slot.spec or {}
                outcomes.append(SeedOutcome(name, index, slot.blueprint, slot.state.name, 1.0, 0, "merged",
                                            "fossilized; folded into the host during training",
                                            spec.get("ir"), spec.get("target"), slot.source))
                continue
            if str(index) not in layer.seeds:
                continue
            seed = layer.seeds[str(index)]
            alpha = float(layer.alpha[index])
            action, reason = _decide(slot.state, alpha, merge)
            if action == "merged" and slot.source is not None:
                action, reason = "branch", "fossilized span seed; widening its hosts needs example inputs to check"
            elif action == "merged" and not merge_into(layer.host, seed, alpha):
                action, reason = "branch", "fossilized; not an exact linear map of the host's input"
            if action == "branch":
                branches.append(seed)
                scales.append(alpha)
                spans.append(slot.source is not None)
                if slot.source is not None:
                    feeders[name] = slot.source
            spec = slot.spec or {}
            outcomes.append(SeedOutcome(name, index, slot.blueprint, slot.state.name, alpha,
                                        sum(p.numel() for p in seed.parameters()), action, reason,
                                        spec.get("ir"), spec.get("target"), slot.source))
    replacements = {name: GrownLayer(layers[name].host, *kept[name]) if kept[name][0] or name in feeders.values()
                    else layers[name].host for name in layers}
    for name, source in feeders.items():
        feeder = replacements[source]
        assert isinstance(feeder, GrownLayer)
        feeder.keep_input = True
        replacements[name]._feeder = (feeder,)
    for name, replacement in replacements.items():
        if name:
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, child, replacement)
        else:
            plain = replacement
    if merge and example is not None and feeders:
        plain, outcomes = _widened(plain, outcomes, example)
    return plain, outcomes


def _widened(plain: nn.Module, outcomes: list[SeedOutcome], example: Any) -> tuple[nn.Module, list[SeedOutcome]]:
    """Fold fossilized span seeds into wider hosts where that is checked to change nothing on ``example``."""
    from esper_core.export.widen import widen_spans
    from esper_core.training.tasks import logits_of

    training = plain.training
    plain.eval()
    reference = next(plain.parameters())
    inputs = to_device(example, reference.device)
    try:
        with torch.no_grad():
            expected = logits_of(call_model(plain, inputs)).double()
    except Exception as error:  # whatever the model's own code raises on inputs that do not fit; kept as the cause
        # Without this, an example of the wrong shape or type surfaced as the model's own traceback (a matmul
        # of mismatched shapes, "'str' object has no attribute ..."), naming neither unwrap nor its argument.
        raise ConfigError(Problem("unwrap", f"the model cannot run an example of shape {shapes_of(example)}: "
                                  f"{one_line(error)}", field="example")) from error
    allowed = TOLERANCE.get(reference.dtype, 1e-5) * max(1.0, float(expected.abs().max()) if expected.numel() else 1.0)

    def check(candidate: nn.Module) -> str | None:
        try:
            with torch.no_grad():
                got = logits_of(call_model(candidate, inputs)).double()
        except Exception as exc:  # noqa: BLE001 - the user's forward code on wider layers: any failure means "keep branches"
            detail = (str(exc).splitlines() or [""])[0][:120]
            return f"the wider model fails on the example inputs ({type(exc).__name__}{': ' if detail else ''}{detail})"
        if got.shape != expected.shape:
            return f"the wider model's output has shape {tuple(got.shape)}, not {tuple(expected.shape)}"
        diff = float((got - expected).abs().max()) if got.numel() else 0.0
        return None if diff <= allowed else \
            f"the wider model's outputs differ by {diff:.3g} (more than {allowed:.3g}): something between the layers"

    plain, notes = widen_spans(plain, GrownLayer, check)
    plain.train(training)
    updated = []
    for outcome in outcomes:
        note = notes.get(outcome.layer)
        if outcome.source is not None and outcome.action == "branch" and outcome.state == "FOSSILIZED" and note:
            outcome = replace(outcome, action="widened" if note.startswith("widened") else "branch",
                              reason=f"fossilized span seed; {note}")
        updated.append(outcome)
    return plain, updated


def _decide(state: SeedState, alpha: float, merge: bool) -> tuple[SeedAction, str]:
    if state == SeedState.FOSSILIZED:
        return ("merged", "fossilized; exact linear map folded into the host") if merge else \
            ("branch", "fossilized; --no-merge keeps it a branch")
    if state == SeedState.TRAINING or alpha == 0.0:
        return "dropped", f"{state.name.lower()}: contributes nothing to the output yet"
    return "branch", f"live ({state.name.lower()}): kept as a branch scaled by its current alpha {alpha:g}"


def changed_layers(host_model: nn.Module, plain: nn.Module) -> dict[str, dict[str, Any]]:
    """The layers of ``plain`` (an :func:`unwrap` result) whose parameters ``host_model`` (the host
    network as its class builds it, e.g. freshly constructed) does not have that way: a bias the class
    builds none for (a biased seed merged into a bias-free host, or a bias-free pair widened by a span
    seed whose units have biases) or a weight of another shape (widened). Per layer name: ``bias_added``,
    the exported ``weight`` and ``bias`` shapes (``bias`` ``None`` when there is none) and the built ones
    (``host_weight``, ``host_bias``). A grown layer is compared through its host. Such a layer does not
    load strictly into the user's own class as built, and dropping the bias would change what the model
    computes: exports record and report these layers instead."""
    built = dict(host_model.named_modules())
    changes: dict[str, dict[str, Any]] = {}
    for name, module in plain.named_modules():
        original = built.get(name)
        layer = module.host if isinstance(module, GrownLayer) else module
        weight, before = getattr(layer, "weight", None), getattr(original, "weight", None)
        if not isinstance(weight, torch.Tensor) or not isinstance(before, torch.Tensor):
            continue
        bias, host_bias = _bias_shape(layer), _bias_shape(original)
        bias_added = host_bias is None and bias is not None
        if bias_added or tuple(weight.shape) != tuple(before.shape):
            changes[name] = {"bias_added": bias_added, "weight": list(weight.shape), "bias": bias,
                             "host_weight": list(before.shape), "host_bias": host_bias}
    return changes


def _bias_shape(module: nn.Module | None) -> list[int] | None:
    bias = getattr(module, "bias", None)
    return list(bias.shape) if isinstance(bias, torch.Tensor) else None
