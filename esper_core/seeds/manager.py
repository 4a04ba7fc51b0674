"""wrap() and the SeedManager: the one place that moves seeds through their lifecycle.

The manager executes; it never decides. Where and what to germinate, and whether a seed is kept,
come from the policy and the trainer's counterfactual evaluation (GradMax's split of "when" from
"how"). Time-driven transitions (incubation over, blend ramp finished, embargo over) happen in
:meth:`SeedManager.step`, called once per optimizer step, so every counter counts optimizer steps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from esper_core.errors import RECIPE_FIELD, ConfigError, Problem
from esper_core.recipe.schema import SeedsConfig
from esper_core.seeds.kasmina import KasminaLayer, SlotInfo
from esper_core.seeds.lifecycle import SeedState
from esper_core.seeds.merge import give_bias
from esper_core.seeds.targets import TargetMismatch, match_targets
from esper_core.seeds.view import LayerView, SeedView, SlotView

Event = dict[str, Any]
_COUNTED = {state: state.name.lower() for state in SeedState}
"""The key of each state in :meth:`SeedManager.counts` (``Enum.name`` is a property: slow per slot)."""


@dataclass(frozen=True)
class SlotRef:
    layer: str
    index: int

    @property
    def key(self) -> str:
        """Stable id of a slot (events, checkpoints and the seed group's recorded member order use it)."""
        return f"{self.layer}#{self.index}"


def alpha_at(schedule: str, progress: float) -> float:
    """Blend weight after ``progress`` (0..1) of the ramp. ``gated`` ramps linearly, but its progress
    only advances while the manager is told the training loss is not rising."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 - 0.5 * math.cos(math.pi * progress)
    return progress


class SeedManager:
    """All Kasmina layers of one model, and the lifecycle clock that drives them."""

    def __init__(self, model: nn.Module, layers: dict[str, KasminaLayer], config: SeedsConfig) -> None:
        self.model = model
        self.layers = layers
        self.config = config
        self.step_count = 0
        self.feeders: dict[str, str] = {}  # span pairs: dest layer -> feeder layer
        self.probed = False  # whether pair_spans ran (a model loaded for export is never probed)

    @contextlib.contextmanager
    def unwrapped_on_failure(self) -> Iterator[None]:
        """Put every host back where its Kasmina layer stands if the block raises: a setup refused
        after :func:`wrap` (a misspelt blueprint, an example without a batch dimension) must leave the
        user's model as it was, or the corrected call is refused as \"already wrapped\". Only for
        setup, before any seed exists."""
        try:
            yield
        except BaseException:
            for name, layer in self.layers.items():
                parent_name, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), child, layer.host)
            raise

    # --- queries ----------------------------------------------------------------------------------

    def slots(self) -> Iterator[tuple[SlotRef, KasminaLayer]]:
        for name, layer in self.layers.items():
            for index in range(len(layer.slots)):
                yield SlotRef(name, index), layer

    def _changing(self) -> Iterator[tuple[SlotRef, KasminaLayer]]:
        """The slots of layers that are not quiet (see :attr:`KasminaLayer.quiet`): the only ones the
        per-step queries below can find anything in."""
        for name, layer in self.layers.items():
            if not layer.quiet:
                for index in range(len(layer.slots)):
                    yield SlotRef(name, index), layer

    def pair_spans(self, order: list[str], inputs: dict[str, tuple[int, ...]],
                   outputs: dict[str, tuple[int, ...]]) -> dict[str, str]:
        """Pair each wrapped layer with the wrapped layer called just before it (``order``: first
        calls in one forward pass) when the earlier one's output shape is the later one's input shape,
        so span seeds of the later layer can read the earlier one's input. Returns dest -> feeder."""
        pairs = {}
        for feeder, dest in zip(order, order[1:]):
            if feeder in self.layers and dest in self.layers and outputs.get(feeder) == inputs.get(dest):
                self.layers[dest].pair(self.layers[feeder])
                pairs[dest] = feeder
        self.feeders = pairs
        self.probed = True
        return pairs

    def view(self) -> SeedView:
        """A read-only copy of every slot, for the policy."""
        return {name: LayerView(layer.spec.kind, tuple(
                    SlotView(s.state, s.blueprint, s.params, s.steps_in_state, s.germinated_at, s.merged)
                    for s in layer.slots))
                for name, layer in self.layers.items()}

    def state(self, ref: SlotRef) -> SeedState:
        return self.layers[ref.layer].slots[ref.index].state

    @property
    def generation(self) -> int:
        """Changes whenever a slot's state or the seeds' parameters change (see
        :attr:`KasminaLayer.generation`; each layer's only grows, so their sum does)."""
        return sum(layer.generation for layer in self.layers.values())

    def counts(self) -> dict[str, int]:
        """Number of slots per lifecycle state (every state listed, zeros included)."""
        counts = dict.fromkeys(_COUNTED.values(), 0)
        for layer in self.layers.values():
            for slot in layer.slots:
                counts[_COUNTED[slot.state]] += 1
        return counts

    def occupied(self) -> int:
        """Seeds that hold parameters (live or fossilized): what budgets count."""
        return sum(1 for ref, layer in self.slots()
                   if layer.slots[ref.index].state.live or layer.slots[ref.index].state == SeedState.FOSSILIZED)

    def added_params(self) -> int:
        return sum(layer.slots[ref.index].params for ref, layer in self.slots()
                   if str(ref.index) in layer.seeds)

    def free_slot(self, layer: str) -> int | None:
        for index, slot in enumerate(self.layers[layer].slots):
            if slot.state == SeedState.DORMANT:
                return index
        return None

    @contextlib.contextmanager
    def all_muted(self) -> Iterator[None]:
        """Every seed that has a module contributes nothing inside the block (the host alone)."""
        with contextlib.ExitStack() as stack:
            for ref, layer in self.slots():
                if str(ref.index) in layer.seeds:
                    stack.enter_context(layer.muted(ref.index))
            yield

    def due_for_verdict(self) -> list[SlotRef]:
        """Seeds that finished probation and wait for the counterfactual evaluation."""
        return [ref for ref, layer in self._changing()
                if layer.slots[ref.index].state == SeedState.PROBATION
                and layer.slots[ref.index].steps_in_state >= self.config.probation_steps]

    def seed_parameters(self, ref: SlotRef) -> list[nn.Parameter]:
        return list(self.layers[ref.layer].seed_module(ref.index).parameters())

    def topology(self) -> dict[str, Any]:
        """JSON-ready description of every layer and slot: enough to rebuild the seeds. ``ir`` and
        ``target`` (a seed's canonical blueprint IR and resolved target: host spec, rank, dtype, shapes)
        make it self-sufficient: :func:`esper_core.export.load.load_run` rebuilds seeds from them with
        the blueprint builder, without the kernel store or a compile."""
        return {
            "step": self.step_count,
            "spans": dict(self.feeders),
            "layers": {name: self._layer_topology(layer) for name, layer in self.layers.items()},
        }

    @staticmethod
    def _layer_topology(layer: KasminaLayer) -> dict[str, Any]:
        """One layer's entry of :meth:`topology`. The blend weights are read in one ``tolist`` (a
        ``float(alpha[i])`` per slot was an indexing op and a host read each: 4 us a slot on the CPU, a
        synchronisation each on a GPU)."""
        alphas = layer.alpha.tolist()
        return {"host": layer.spec.to_json(),
                # a merge may have given a bias-free host one, which a host rebuilt for loading must get back
                "host_bias": getattr(layer.host, "bias", None) is not None,
                "slots": [
                    {"state": s.state.name, "blueprint": s.blueprint, "kernel": s.kernel, "params": s.params,
                     "steps_in_state": s.steps_in_state, "embargo_left": s.embargo_left,
                     "germinated_at": s.germinated_at, "alpha": alphas[i], "source": s.source,
                     "merged": s.merged,
                     "ir": s.spec["ir"] if s.spec else None, "target": s.spec["target"] if s.spec else None}
                    for i, s in enumerate(layer.slots)]}

    def restore(self, topology: dict[str, Any], build: Callable[[str, str], nn.Module]) -> list[SlotRef]:
        """Recreate every seed a :meth:`topology` recorded (weights come later, from the state dict);
        ``build(layer, blueprint)`` makes the module. Returns the slots that hold a module, in order."""
        if set(topology["layers"]) != set(self.layers):
            raise ValueError(f"the checkpoint's seeds grow on {', '.join(topology['layers'])}, and this model wraps "
                             f"{', '.join(self.layers)}: seeds.targets must select the same layers")
        self.step_count = topology["step"]
        holding = []
        for name, entry in topology["layers"].items():
            host = self.layers[name].host
            if entry.get("host_bias") and getattr(host, "bias", False) is None:  # a merge gave it one
                give_bias(host)
            for index, raw in enumerate(entry["slots"]):
                spec = {"ir": raw["ir"], "target": raw["target"]} if raw.get("ir") and raw.get("target") else None
                info = SlotInfo(SeedState[raw["state"]], raw["blueprint"], raw["kernel"], raw["params"],
                                raw["steps_in_state"], raw["embargo_left"], raw["germinated_at"], spec,
                                raw.get("source"))
                if info.source is not None:
                    self._restore_pair(name, index, info.source)
                info.merged = bool(raw.get("merged", False))
                holds_module = info.state.contributes and not info.merged  # a GERMINATED seed's kernel is requested again
                seed = build(name, info.blueprint) if holds_module else None
                self.layers[name].restore_slot(index, info, seed)
                if seed is not None:
                    holding.append(SlotRef(name, index))
        return holding

    def _restore_pair(self, name: str, index: int, source: str) -> None:
        """Check a recorded span seed's feeder against the pairs a probe found, or, in a model that was
        never probed (a run loaded for export or inference), pair the layers as recorded: the seed's
        weights then only load if their shapes fit the feeder."""
        if self.probed:
            if self.feeders.get(name) != source:
                raise ValueError(f"{name} slot {index} holds a span seed fed by {source!r}, which is not "
                                 f"the layer before it in this model")
            return
        if source not in self.layers or source == name:
            raise ValueError(f"{name} slot {index} holds a span seed fed by {source!r}, which is not a wrapped layer")
        self.layers[name].pair(self.layers[source])
        self.feeders[name] = source

    # --- transitions --------------------------------------------------------------------------------

    def germinate(self, ref: SlotRef, blueprint: str, kernel: str, params: int,
                  spec: dict[str, Any] | None = None, source: str | None = None) -> Event:
        """Reserve ``ref`` for a kernel (``spec``: its plain form, recorded in the topology; ``source``: a
        span seed's feeder layer); the seed starts incubating when its module arrives."""
        self.layers[ref.layer].germinate(ref.index, blueprint, kernel, params, self.step_count, spec, source)
        fields = {"params": params} | ({"source": source} if source is not None else {})
        return self._event("germinate", ref, **fields)

    def start_incubation(self, ref: SlotRef, seed: nn.Module) -> Event:
        self.layers[ref.layer].start_incubation(ref.index, seed)
        return self._event("incubate", ref)

    def pending(self) -> list[SlotRef]:
        """Germinated seeds still waiting for their kernel."""
        return [ref for ref, layer in self._changing() if layer.slots[ref.index].state == SeedState.GERMINATED]

    def fossilize(self, ref: SlotRef, **evidence: Any) -> Event:
        self.layers[ref.layer].fossilize(ref.index)
        return self._event("fossilize", ref, **evidence)

    def cull(self, ref: SlotRef, *, rolled_back: bool = False, **evidence: Any) -> tuple[Event, list[nn.Parameter]]:
        """Remove a seed; returns its (now detached) parameters for the optimizer to forget."""
        target = SeedState.ROLLED_BACK if rolled_back else SeedState.CULLED
        blueprint = self.layers[ref.layer].slots[ref.index].blueprint
        params = self.layers[ref.layer].remove(ref.index, target, self.config.embargo_steps)
        return self._event("rollback" if rolled_back else "cull", ref, blueprint=blueprint, **evidence), params

    def step(self, gate_open: bool = True) -> list[Event]:
        """Advance every seed by one optimizer step; returns the lifecycle events that happened."""
        self.step_count += 1
        cfg, events = self.config, []
        for ref, layer in self._changing():
            slot = layer.slots[ref.index]
            state = slot.state
            if state == SeedState.TRAINING:
                slot.steps_in_state += 1
                if slot.steps_in_state >= cfg.incubation_steps:
                    layer.start_blending(ref.index)
                    events.append(self._event("blend", ref))
            elif state == SeedState.BLENDING:
                if gate_open or cfg.blend_schedule != "gated":
                    slot.steps_in_state += 1
                progress = slot.steps_in_state / cfg.blend_steps
                if progress >= 1.0:
                    layer.start_probation(ref.index)
                    events.append(self._event("probation", ref))
                else:
                    layer.set_alpha(ref.index, alpha_at(cfg.blend_schedule, progress))
            elif state == SeedState.PROBATION:
                slot.steps_in_state += 1
            elif state in (SeedState.CULLED, SeedState.ROLLED_BACK):
                slot.embargo_left -= 1
                if slot.embargo_left <= 0:
                    layer.reopen(ref.index)
                    events.append(self._event("reopen", ref))
        return events

    def _event(self, kind: str, ref: SlotRef, **fields: Any) -> Event:
        slot = self.layers[ref.layer].slots[ref.index]
        return {"event": kind, "step": self.step_count, "layer": ref.layer, "slot": ref.index,
                "blueprint": fields.pop("blueprint", slot.blueprint), "state": slot.state.name, **fields}


def wrap(model: nn.Module, targets: Sequence[str] | None = None, per_layer: int | None = None,
         exclude: Sequence[str] | None = None, config: SeedsConfig | None = None) -> SeedManager:
    """Wrap the selected layers of ``model`` in place and return their :class:`SeedManager`.

    ``targets``/``per_layer``/``exclude`` override the same keys of ``config`` (defaults otherwise).
    A pattern that matches nothing raises :class:`~esper_core.errors.ConfigError` listing the
    module names that could have matched.
    """
    wrapped = [name for name, module in model.named_modules() if isinstance(module, KasminaLayer)]
    if wrapped:
        raise ConfigError(Problem(source=RECIPE_FIELD, field="seeds.targets", message=(
            f"the model is already wrapped (Kasmina layers at {', '.join(wrapped[:5])}"
            f"{' ...' if len(wrapped) > 5 else ''}); wrap a model once, and keep its SeedManager")))
    overrides = {k: v for k, v in (("targets", targets), ("per_layer", per_layer), ("exclude", exclude))
                 if v is not None}
    config = SeedsConfig.model_validate({**(config or SeedsConfig()).model_dump(), **overrides})
    try:
        names = match_targets(model, config.targets, config.exclude)
    except TargetMismatch as exc:
        raise ConfigError(Problem(source=RECIPE_FIELD, field=f"seeds.{exc.which}.{exc.index}",
                                  message=exc.message)) from None
    if not names:
        raise ConfigError(Problem(source=RECIPE_FIELD, field="seeds.exclude", message="excludes every targeted module"))
    layers: dict[str, KasminaLayer] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = KasminaLayer(getattr(parent, child), config.per_layer, config.eta)
        setattr(parent, child, layer)
        layers[name] = layer
    return SeedManager(model, layers, config)
