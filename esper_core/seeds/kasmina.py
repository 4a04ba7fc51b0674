"""KasminaLayer: a host layer plus a few seed slots, computing ``y = f(x) + sum_s w_s * g_s(x)``.

The layer owns the *mechanism* of each lifecycle state; when a state changes is decided by the
:class:`~esper_core.seeds.manager.SeedManager` and the policy. What the forward pass sees of a seed
is its state (which computation it takes, see :func:`_seed_path`) and its blend weight ``alpha``, a
buffer per slot, so blending changes no Python value. Under ``torch.compile`` no state change of a
seed within a compiled pass's topology recompiles the model: ``esper train`` on one device compiles
whole-graph passes (:func:`compile_whole_graph`) only for topologies in which every layer is settled
(:meth:`KasminaLayer.settled`) and runs the others eagerly; where and when each topology compiles
(off the training thread when the run need not be deterministic) is ``esper_core.training.compiled``'s
choice; under DDP the seed path runs eagerly between compiled host regions
(:data:`_seed_path_boundary`).

A *span* seed lives in the slot of the second layer of a consecutive pair: it reads the input of the
layer before (its ``feeder``, which keeps its last input while a span seed needs it) and adds to
this layer's output, so its hidden units widen the feeder's layer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esper_core.blueprints.host import HostSpec
from esper_core.seeds.lifecycle import SeedState, check_transition


class _Incubate(torch.autograd.Function):
    """An incubating seed's output ``g`` joined to its layer's output ``y`` without changing it.

    Forward: ``y`` exactly (the seed adds nothing while it incubates). Backward: ``dL/dy`` passes on
    untouched and the seed output receives ``dL/dy + g / (eta * B)``, the gradient of
    ``<g, dL/dy> + ||g||^2 / (2 eta B)``, whose minimiser is ``g = -eta * B * dL/dy``: the seed regresses
    onto the part of the functional gradient the host is missing (straight-through incubation with a
    proximal pull). Because the loss is mean-reduced, ``B * dL/dy`` is a per-sample gradient, so
    ``eta`` is in per-sample units. ``scaler`` is fp16 training's ``GradScaler``: the pull must be
    scaled like the gradient it joins, by the scale the loss was multiplied with for this backward
    pass (read then, as the device tensor: no host-device sync, and right on the first step after a
    resume, before which the scaler has no scale tensor yet). The seed's input is detached, so
    nothing reaches the host through it.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, out: torch.Tensor, eta: float,  # type: ignore[override]
                scaler: torch.amp.GradScaler | None) -> torch.Tensor:
        ctx.save_for_backward(out)
        ctx.eta, ctx.scaler = eta, scaler
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        out, = ctx.saved_tensors
        pull = 1.0 / (ctx.eta * out.shape[0])
        scaler = ctx.scaler
        if scaler is None or not scaler.is_enabled() or scaler._scale is None:
            return grad, grad.add(out, alpha=pull), None, None
        return grad, torch.addcmul(grad, out, scaler._scale.to(out.dtype) * pull), None, None


FIXED, INCUBATING, BLENDED = "fixed", "incubating", "blended"
"""How a live seed is computed: a plain branch (probation and fossilized: ``alpha`` is 1), hooked in
by :class:`_Incubate` (incubating), or scaled by its ``alpha`` (blending). A muted seed is not
computed at all."""


def _seed_path(layer: KasminaLayer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Everything a layer does beyond its host: keep the input for a span seed, add each live seed's
    contribution, and let the growth controller measure the pass it asked for.

    Each state gets the cheapest exact computation: a seed in probation or fossilized is ``y + g``
    (no ``* 1``), a blending one ``y + alpha * g`` through plain autograd (no pull term, whose factor
    is zero then), an incubating one adds nothing forward and only its pull backward. One fused op with
    ``alpha``/``isolate`` factors for every state cost two autograd functions and five elementwise
    passes per seed per step: 1.24-1.47x the step time of the same branch written by hand on an H200
    (``benchmarks/kernel_overhead.py``), the bulk of a growing run's overhead (issue 13)."""
    if layer.capture:
        layer.captured = x
    for index, seed, span, mode in layer._active:
        source = layer._feeder[0].captured if span else x
        if mode == FIXED:
            y = y + seed(source)
        elif mode == INCUBATING:
            y = _Incubate.apply(y, seed(source.detach()), layer.eta, layer.grad_scaler)
        else:
            y = y + seed(source) * layer.alpha[index]
    if layer.probe is not None and torch.is_grad_enabled():
        layer.probe(layer, x, y)
    return y


_seed_path_boundary = torch.compiler.disable(_seed_path)
"""What a compiled model calls instead: the seed path runs eagerly between compiled host regions, so
a seed appearing, changing state or leaving never recompiles the model (no guard reads the seed
list) — a topology change costs no compile stall. The price is one graph break per wrapped layer, and
more in a model that loops over its blocks: dynamo cannot resume inside a loop, so it skips the
model's whole frame (for every ``torch.compile`` wrapper of that model, since the skip is recorded on
the code) and compiles only the frames below it. ``esper train`` uses it only under DDP, where every
step goes through one wrapper."""

_whole_graph = False


def compile_whole_graph(enabled: bool) -> None:
    """Tell compiled forward passes to trace each Kasmina layer as it is (its host, and its seed path
    when it has one), so the model compiles as one graph per topology, without the break per wrapped
    layer that :data:`_seed_path_boundary` costs (0.8 of the plain compiled loop's speed on an H200 for
    a dormant CNN). Dynamo's guards then read each layer's seed list, so a pass compiled for one
    topology is never reused for another. Set it for a whole run, not per step: compiles may run on a
    background thread while the training thread runs eagerly (``esper_core.training.compiled``), and
    never call a wrapper that has compiled flag-on passes with the flag off (a frame of the user's
    model that ends *before* a Kasmina layer never reads the flag, so its entry would answer for both,
    and a break inside the model's loop would skip its frame for good)."""
    global _whole_graph
    _whole_graph = enabled


@dataclass
class SlotInfo:
    """Bookkeeping of one slot. Counters count optimizer steps."""

    state: SeedState = SeedState.DORMANT
    blueprint: str | None = None
    kernel: str | None = None  # content address of the kernel the seed was built from
    params: int = 0
    steps_in_state: int = 0
    embargo_left: int = 0
    germinated_at: int | None = None
    spec: dict[str, Any] | None = None
    """The kernel spec's plain form (``{"ir": canonical blueprint IR, "target": host, rank, ...}``): with
    it a recorded topology rebuilds the seed with the blueprint builder alone, without the kernel store."""
    source: str | None = None  # a span seed's feeder layer (it reads that layer's input)
    merged: bool = False  # a fossilized linear seed folded into the host's weight (no module left)


class KasminaLayer(nn.Module):
    """Wraps one host ``nn.Linear``/``nn.Conv2d``; see the module docstring."""

    def __init__(self, host: nn.Module, slots: int, eta: float) -> None:
        super().__init__()
        self.host = host
        self.spec = HostSpec.of(host)
        self.eta = eta
        self.seeds = nn.ModuleDict()
        reference = next(host.parameters())
        self.register_buffer("alpha", torch.zeros(slots, device=reference.device, dtype=reference.dtype))
        self.slots = [SlotInfo() for _ in range(slots)]
        self.quiet = True
        """Every slot dormant or fossilized: nothing for the lifecycle clock to advance, so the seed
        manager skips the layer without looking at its slots (a per-step cost of every wrapped layer)."""
        self.generation = 0
        """Counts the changes of a slot's state or of the layer's parameters (a seed module joining or
        leaving, a merge into the host, a restored slot): what is derived from them (the model's
        parameter count that a run logs) need not be recomputed while it stays the same."""
        self._active: list[tuple[int, nn.Module, bool, str]] = []  # (slot, seed, span, mode)
        self._muting: list[int] = []  # slots inside a ``muted`` context (once per context): left out of the pass
        self._feeder: tuple[KasminaLayer, ...] = ()  # a tuple, so the feeder is not registered as a child
        self.capture = False  # keep the last input (a span seed of the next layer reads it)
        self.captured: torch.Tensor | None = None
        self.probe: Callable[[KasminaLayer, torch.Tensor, torch.Tensor], None] | None = None
        """Set by the growth controller for the one forward pass it measures (health signals); one
        attribute check per forward otherwise, so a dormant layer costs (almost) nothing."""
        self.grad_scaler: torch.amp.GradScaler | None = None  # fp16's loss scaler, given to the growth controller

    def __deepcopy__(self, memo: dict[int, Any]) -> KasminaLayer:
        """A copy (an EMA or best-model snapshot, an export) holds the layer's modules, seeds and state,
        not the hooks of the run that drives it: no measurement probe (a bound method of the growth
        controller, which holds locks and must not be fed by a copy) and the same loss scaler."""
        if self.probe is not None:
            memo.setdefault(id(self.probe), None)
        if self.grad_scaler is not None:
            memo.setdefault(id(self.grad_scaler), self.grad_scaler)
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        twin.__setstate__({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            y = self.host(x)
            return _seed_path(self, x, y) if _whole_graph else _seed_path_boundary(self, x, y)
        # Eagerly, the host from the module dict: ``self.host`` is found only by nn.Module.__getattr__,
        # after a failed ordinary lookup (1.5 us a layer and pass, where a dormant layer should cost
        # almost nothing over its host).
        y = self._modules["host"](x)
        if self.idle():
            return y  # dormant: the host alone, no further call
        return _seed_path(self, x, y)

    def idle(self) -> bool:
        """Whether the layer is its host alone right now (no live seed, no measurement, no capture)."""
        return not self._active and self.probe is None and not self.capture

    def settled(self) -> bool:
        """Whether this layer's pass is one that stays put: no measurement, and every seed it computes a
        plain branch (probation or fossilized; incubating and blending seeds change how they are
        computed within a few hundred steps). ``esper train`` compiles a whole-graph pass only when every
        layer is settled, so a compile is spent on a topology that lasts."""
        return self.probe is None and all(mode == FIXED for *_, mode in self._active)

    def topology(self) -> tuple[Any, ...]:
        """What a compiled pass of this layer depends on (its guards): which slots it computes, from
        which kernel, reading which input, in which way, and whether it keeps its input. Seeds built
        from one kernel have one structure, so a pass compiled for one serves the other."""
        return self.capture, tuple((i, self.slots[i].kernel, span, mode) for i, _, span, mode in self._active)

    # --- mechanism of each transition (called by the SeedManager) ---------------------------------

    def transition(self, index: int, target: SeedState) -> None:
        slot = self.slots[index]
        check_transition(slot.state, target)
        slot.state = target
        slot.steps_in_state = 0
        self.generation += 1
        self._update_quiet()

    def _update_quiet(self) -> None:
        self.quiet = all(s.state in (SeedState.DORMANT, SeedState.FOSSILIZED) for s in self.slots)

    @property
    def feeder(self) -> KasminaLayer | None:
        """The layer before this one whose input span seeds read (``None`` if unpaired)."""
        return self._feeder[0] if self._feeder else None

    def pair(self, feeder: KasminaLayer | None) -> None:
        self._feeder = (feeder,) if feeder is not None else ()

    def germinate(self, index: int, blueprint: str, kernel: str, params: int, step: int,
                  spec: dict[str, Any] | None = None, source: str | None = None) -> None:
        """Reserve the slot for a kernel (DORMANT -> GERMINATED). Nothing runs until the kernel's
        module arrives with :meth:`start_incubation`, so a slow compile never holds training up.
        ``source`` names the feeder layer of a span seed."""
        if source is not None and self.feeder is None:
            raise ValueError("a span seed needs a feeder layer")
        self.transition(index, SeedState.GERMINATED)
        slot = self.slots[index]
        slot.blueprint, slot.kernel, slot.params, slot.germinated_at = blueprint, kernel, params, step
        slot.spec = spec
        slot.source = source

    def start_incubation(self, index: int, seed: nn.Module) -> None:
        """GERMINATED -> TRAINING: the seed joins the forward pass with value exactly zero."""
        self.transition(index, SeedState.TRAINING)
        reference = next(self.host.parameters())
        self.seeds[str(index)] = seed.to(device=reference.device, dtype=reference.dtype)
        self.slots[index].params = sum(p.numel() for p in seed.parameters())
        self.set_alpha(index, 0.0)
        self._refresh_active()

    def start_blending(self, index: int) -> None:
        self.transition(index, SeedState.BLENDING)
        self.set_alpha(index, 0.0)
        self._refresh_active()

    def set_alpha(self, index: int, value: float) -> None:
        """``fill_`` on the device, not ``alpha[index] = value``: item assignment copies a host scalar,
        which synchronises the GPU at every blending step."""
        with torch.no_grad():
            self.alpha[index].fill_(value)

    def start_probation(self, index: int) -> None:
        self.transition(index, SeedState.PROBATION)
        self.set_alpha(index, 1.0)
        self._refresh_active()  # a plain branch from now on

    def fossilize(self, index: int) -> None:
        self.transition(index, SeedState.FOSSILIZED)

    def release_merged(self, index: int) -> list[nn.Parameter]:
        """A fossilized seed whose map is now part of the host's weight: drop its module (it adds no
        parameter any more); returns its parameters for the optimizer to forget."""
        slot = self.slots[index]
        if slot.state != SeedState.FOSSILIZED:
            raise ValueError("only a fossilized seed can be merged into its host")
        seed = self.seeds.pop(str(index))
        slot.merged, slot.params = True, 0
        self.generation += 1
        self._refresh_active()
        return list(seed.parameters())

    def remove(self, index: int, target: SeedState, embargo: int) -> list[nn.Parameter]:
        """Cull or roll back: the seed leaves the forward pass and the module; returns its parameters
        so the caller can drop them from the optimizer."""
        self.transition(index, target)
        seed = self.seeds.pop(str(index)) if str(index) in self.seeds else nn.Module()  # GERMINATED: no module yet
        self.set_alpha(index, 0.0)
        slot = self.slots[index]
        slot.embargo_left = embargo
        self._refresh_active()
        return list(seed.parameters())

    def reopen(self, index: int) -> None:
        """CULLED/ROLLED_BACK -> DORMANT after the embargo."""
        self.transition(index, SeedState.DORMANT)
        self.slots[index] = SlotInfo()

    def restore_slot(self, index: int, info: SlotInfo, seed: nn.Module | None) -> None:
        """Put a slot back exactly as a checkpoint recorded it. Not a transition: the recorded state
        was reached legally in the run that wrote the checkpoint. Buffers come from the state dict."""
        self.slots[index] = info
        self._update_quiet()
        if str(index) in self.seeds:
            del self.seeds[str(index)]
        if seed is not None:
            reference = next(self.host.parameters())
            self.seeds[str(index)] = seed.to(device=reference.device, dtype=reference.dtype)
        self.generation += 1
        self._refresh_active()

    def muted(self, index: int) -> "_Muted":
        """Context in which slot ``index`` contributes nothing (counterfactual evaluation)."""
        return _Muted(self, index)

    def seed_module(self, index: int) -> nn.Module:
        return self.seeds[str(index)]

    def _mode(self, index: int) -> str:
        state = self.slots[index].state
        if state == SeedState.TRAINING:
            return INCUBATING
        return BLENDED if state == SeedState.BLENDING else FIXED  # alpha is exactly 1 from probation on

    def _refresh_active(self) -> None:
        self._active = [(i, self.seeds[str(i)], s.source is not None, self._mode(i))
                        for i, s in enumerate(self.slots)
                        if s.state.contributes and str(i) in self.seeds and i not in self._muting]
        if self.feeder is not None:
            self.feeder.capture = any(span for _, _, span, _ in self._active)
            if not self.feeder.capture:
                self.feeder.captured = None


class _Muted:
    def __init__(self, layer: KasminaLayer, index: int) -> None:
        self.layer, self.index = layer, index

    def __enter__(self) -> None:
        self.layer._muting.append(self.index)
        self.layer._refresh_active()

    def __exit__(self, *exc: object) -> None:
        self.layer._muting.remove(self.index)
        self.layer._refresh_active()
