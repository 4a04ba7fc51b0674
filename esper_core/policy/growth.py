"""Tamiyo, the growth policy: when to grow, where, what, and how much.

- **When**: on a validation plateau or periodically, only inside the growth window (the rest of
  training is kept for fine-tuning). While the run underfits (the validation loss is within
  ``underfit_gap`` of the training loss) the period and the plateau patience shrink by
  ``underfit_speedup``: capacity is what such a run lacks.
- **Where**: layers ranked by the residual functional gradient at their output, then by their own
  seeds' verdicts as those arrive (:class:`LayerEvidence`), eligible only above ``merit_ratio`` of the best.
- **What**: the orchestrator strategy turns the best eligible layer into a plan, using the
  :class:`~esper_core.policy.selector.SeedSelector`'s bandit choices.
- **How much**: budgets in seeds, parameters and forward FLOPs, and a latency limit per seed.

It decides only, from a read-only :class:`~esper_core.seeds.view.SeedView`; the growth controller
executes (GradMax's split of "when" from "how"), and never gets called back. Every decision carries a sentence saying why and the inputs it was made from (signals,
arm statistics, budgets), recorded verbatim in the event log.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from esper_core.policy.bandits import ArmStats
from esper_core.policy.orchestrator import Germination, Plan, build_strategy
from esper_core.policy.selector import Candidate, Choice, SeedSelector, arm_key
from esper_core.policy.signals import GlobalSignals, LayerHealth, LayerSignals, PlateauTracker
from esper_core.recipe.schema import PolicyConfig
from esper_core.seeds.lifecycle import SeedState
from esper_core.seeds.manager import SlotRef
from esper_core.seeds.view import SeedView, SlotView


@dataclass(frozen=True)
class SeedCost:
    """What a blueprint adds to one layer: parameters and forward FLOPs per sample."""

    params: int
    flops: int


@dataclass(frozen=True)
class GrowthDecision:
    slot: SlotRef
    blueprint: str
    reason: str
    merit: float
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CullDecision:
    slot: SlotRef
    reason: str
    evidence: dict[str, Any]


@dataclass
class LayerEvidence:
    """What one layer's judged seeds measurably bought: their rewards (the selector's unit, metric gain
    per 1000 added parameters) and the placement scores the layer had when each was germinated. A layer
    has an entry only once a seed of it has been judged."""

    seeds: int = 0
    reward: float = 0.0
    score: float = 0.0

    def add(self, reward: float, score: float) -> None:
        self.seeds += 1
        self.reward += reward
        self.score += score

    def to_json(self) -> list[float]:
        return [self.seeds, self.reward, self.score]


@dataclass
class Decisions:
    """What to do now: culls first, then germinations; ``skipped`` says why nothing grew although the
    trigger fired (``None`` when that was already reported, or when nothing was due)."""

    culls: list[CullDecision] = field(default_factory=list)
    germinations: list[GrowthDecision] = field(default_factory=list)
    skipped: dict[str, Any] | None = None


class GrowthPolicy:
    """See the module docstring.

    ``kinds`` maps each wrapped layer to its host kind; ``blueprints_for(layer)`` lists the recipe's
    blueprints that can grow on a layer, in preference order; ``cost_of(blueprint, layer)`` gives a seed's size;
    ``latency_of(blueprint, layer)`` reads its measured latency, ``None`` while the kernel is still
    compiling (only called when ``max_latency_ms`` is set; remembered in the state so a resumed run
    decides alike); ``seed`` seeds the
    selector's private generator; ``eta`` is the incubation step size the health prior uses.
    """

    def __init__(self, config: PolicyConfig, max_steps: int, kinds: dict[str, str],
                 blueprints_for: Callable[[str], list[str]], cost_of: Callable[[str, str], SeedCost], *,
                 seed: int, eta: float, latency_of: Callable[[str, str], float | None] | None = None) -> None:
        self.config = config
        self.max_steps = max_steps
        self.kinds = kinds
        self.blueprints_for = blueprints_for
        self.cost_of = cost_of
        self.latency_of = latency_of
        self.eta = eta
        self.layers = LayerSignals(config.merit_decay)
        self.signals = GlobalSignals(config.trend_window, PlateauTracker(config.plateau_patience,
                                                                         config.plateau_min_delta))
        self.selector = SeedSelector(config.selector, seed)
        self.strategy = build_strategy(config.orchestrator, config.ensemble_size, config.replace_after)
        self.last_growth_step = -1
        self.reserved: dict[str, Germination] = {}  # slot key -> replacement waiting for its slot
        self.kept: dict[str, int] = {}  # arm -> fossilized seeds (SPECIALIZE's evidence)
        self.evidence: dict[str, LayerEvidence] = {}  # layer -> its judged seeds (placement's evidence)
        self.scored: dict[str, float] = {}  # slot key of a live seed -> its layer's placement score at germination
        self.forbidden: set[tuple[str, str]] = set()  # (layer, blueprint) whose kernel is unusable
        self.latency: dict[tuple[str, str], float] = {}
        self._costs: dict[tuple[str, str], SeedCost] = {}
        # The random baseline's own generator and schedule (policy.random).
        self._rng = np.random.default_rng(np.random.SeedSequence([seed, 0xBA5E]))
        self._next_random = round(config.growth_window[0] * max_steps + self._rng.random() * config.period_steps)
        self._last_skip: str | None = None
        # Set for the duration of one decide() call (the Planner interface of the strategies).
        self.step = 0
        self.seeds: SeedView = {}
        self._health: dict[str, LayerHealth] = {}
        self._contributions: dict[str, float] = {}
        self._pending: list[Candidate] = []

    # --- signals -----------------------------------------------------------------------------------

    def in_window(self, step: int) -> bool:
        start, end = self.config.growth_window
        return start * self.max_steps <= step < end * self.max_steps

    def window_over(self, step: int) -> bool:
        """Whether no later step is in the growth window."""
        return step >= self.config.growth_window[1] * self.max_steps

    def observe_train(self, step: int, loss: float) -> None:
        self.signals.observe_train(step, loss)

    def observe_validation(self, step: int, loss: float | None, score: float) -> None:
        """A validation result: its loss (trend, train-val gap) and its metric oriented so that lower is
        better (the plateau is detected on the task's metric)."""
        self.signals.observe_validation(step, loss, score)

    # --- when ---------------------------------------------------------------------------------------

    def _triggered(self, step: int) -> str | None:
        cfg = self.config
        if cfg.random:
            return f"random trigger: due at step {self._next_random}" if step >= self._next_random else None
        underfit = self.signals.underfitting(cfg.underfit_gap) and cfg.underfit_speedup > 1
        speed = cfg.underfit_speedup if underfit else 1.0
        faster = (f", /{speed:g} while underfitting: train-val gap {self.signals.gap:.3g}"
                  if underfit else "")
        if cfg.trigger == "periodic":
            period = max(1, round(cfg.period_steps / speed))
            if self.last_growth_step < 0:
                return f"periodic trigger: first growth of the window (period {period} steps{faster})"
            since = step - self.last_growth_step
            return f"periodic trigger: {since} steps since the last growth (period {period}{faster})" \
                if since >= period else None
        patience = max(1, math.ceil(cfg.plateau_patience / speed))
        plateau = self.signals.plateau
        if not plateau.plateaued(patience):
            return None
        return (f"validation plateau for {step - plateau.best_step} steps ({plateau.stale} evaluations without "
                f"a {cfg.plateau_min_delta:g} improvement on {plateau.best:.4f}; patience {patience}{faster})")

    # --- the decision -------------------------------------------------------------------------------

    def to_measure(self, step: int, seeds: SeedView) -> list[SlotRef]:
        """Live seeds whose counterfactual gain :meth:`decide` will need at ``step`` (only REPLACE,
        when growth is due): the controller measures them first and passes the gains in."""
        if self._triggered(step) is None or not self.in_window(step):
            return []
        return self.strategy.to_measure(seeds, step)

    def decide(self, step: int, seeds: SeedView, merit: dict[str, float],
               contributions: dict[str, float] | None = None) -> Decisions:
        """What to do at evaluation step ``step``. ``contributions`` maps the slot keys
        :meth:`to_measure` asked for to their counterfactual metric gain."""
        self.step, self.seeds, self._contributions = step, seeds, dict(contributions or {})
        out = Decisions()
        self._release_reserved(out)
        why = self._triggered(step)
        if why is None or not self.in_window(step) or out.germinations:  # a released slot is this round's growth
            return out
        order = list(self._rng.permutation(len(seeds))) if self.config.random else None
        inputs = {"trigger": why, "global": self.signals.to_json(), "strategy": self.strategy.name,
                  "placement": "random" if self.config.random else self.config.placement, "budget": self._budget()}
        if self._seeds_used() >= self.config.max_seeds:  # before the health read: a pseudo-inverse per layer
            return self._skip(out, "seeds", f"{why}; but the seed budget is spent "
                              f"({self._seeds_used()} of {self.config.max_seeds})", inputs)
        self._health = self.layers.read()
        if order is not None:  # the baseline: a random order of the layers, every one eligible
            ranked = [(0.0, name) for _, name in sorted(zip(order, seeds))]
        else:
            ranked = sorted(((self._placement_score(name, merit), name) for name in seeds), reverse=True)
        # the bar is set by the layers that could take a seed: a full one (or one no blueprint fits)
        # must not keep every other layer below ``merit_ratio`` of its score for good
        best = max((score for score, name in ranked if self._has_room(name)), default=0.0)
        waiting = self._awaiting_verdicts()
        inputs["layers"] = {name: {"score": round(score, 6), "merit": round(merit.get(name, 0.0), 6), "rank": rank,
                                   **self._evidence_json(name, waiting),
                                   **(self._health[name].to_json() if name in self._health else {})}
                            for rank, (score, name) in enumerate(ranked, start=1)}
        self._pending = []
        what = "random order" if self.config.random else self.config.placement
        for rank, (score, name) in enumerate(ranked, start=1):
            if best > 0 and score < self.config.merit_ratio * best:
                break
            if name in waiting:
                continue
            plan = self.strategy.plan(self, name)
            if plan is None:
                continue
            self._adopt(plan, out, name, f"{why}; {what} score {score:.3g} (rank {rank} of {len(ranked)})",
                        score, inputs)
            if len(out.germinations) + len(plan.reserve) >= self.config.max_germinations:
                break
        self._pending = []
        if out.germinations or out.culls:
            self.last_growth_step = self.step
            if self.config.random:
                self._next_random = self.step + round(self.config.period_steps * (0.5 + self._rng.random()))
            self.signals.plateau.reset()
            self._last_skip = None
            return out
        return self._skip(out, "nothing", f"{why}; but no layer above {self.config.merit_ratio:g} of the best score "
                          f"can take a seed now (busy, full, or no blueprint within the budgets)", inputs)

    def _placement_score(self, layer: str, merit: dict[str, float]) -> float:
        """How much ``layer`` needs capacity. ``residual``: the squared size, per sample, of the part of
        the functional gradient at its output that its own weights cannot express (TINY's expressivity
        bottleneck): the first-order loss decrease only new capacity there can buy, corrected by what
        seeds measurably bought (:meth:`_calibrated`). ``merit``: raw gradient merit.

        Not the residual's *share* of the functional gradient, which ranked layers before: it was 0.93-0.98
        on every layer of a six-layer MLP (one batch's gradient is mostly inexpressible anywhere), so the
        ranking was noise. The size separates them (10-20x between layers there) and points where width
        pays: eight span seeds on its first two hidden layers gave 74.3% on mnist1d against 62.8% on
        the middle two and 61.9% on the last two (5 seeds each); the residual was largest there."""
        if self.config.placement == "merit":
            return merit.get(layer, 0.0)
        return self._calibrated(layer, self._residual_score(layer))

    def _residual_score(self, layer: str) -> float:
        health = self._health.get(layer)
        residual = health.residual if health is not None and health.finite else 0.0
        return residual if math.isfinite(residual) else 0.0

    def _calibrated(self, layer: str, residual: float) -> float:
        """The residual score, once verdicts have arrived, turned into a prediction of the layer's reward
        and corrected by the layer's own verdicts.

        The residual says where a first-order step could lower the loss; it does not say where new units
        will raise the metric. On the 32-32 MLP it ranked the second hidden layer first on mnist1d, yet the
        seeds widening the first hidden layer bought 2.4 accuracy points each at their verdicts against 0.2
        for those widening the second (seed 100; teacher 0.5 against 0.0), and putting every seed in the
        first gave +2 points. So: ``c`` = the rewards of all judged seeds over the scores their layers had
        when they were germinated converts a score into a predicted reward; a layer without verdicts is
        ranked by ``c * residual``, and one with ``n`` verdicts by the mean of its rewards with that
        prediction counted as ``selector.prior_weight`` more (the selector's pseudo-pulls). Before any
        verdict the ranking is the residual's."""
        if not self.evidence:
            return residual
        scores = sum(e.score for e in self.evidence.values())
        predicted = residual * sum(e.reward for e in self.evidence.values()) / scores if scores > 0 else 0.0
        mine = self.evidence.get(layer)
        if mine is None:
            return predicted
        weight = self.config.selector.prior_weight
        return (weight * predicted + mine.reward) / (weight + mine.seeds)

    def _evidence_json(self, layer: str, waiting: set[str]) -> dict[str, Any]:
        """The verdicts behind a layer's score, for the decision's recorded inputs."""
        e = self.evidence.get(layer)
        if e is None:
            return {}
        return {"verdicts": e.seeds, "mean_reward": round(e.reward / e.seeds, 6), "waits": layer in waiting}

    def _awaiting_verdicts(self) -> set[str]:
        """Layers that wait this round: those with verdicts already, while another layer's first seeds
        are still awaiting theirs. The layer judged first would otherwise be ranked against a residual
        guess, not the evidence about to arrive (mnist1d, seed 100: the second hidden layer, judged
        first, took two more seeds 50 steps before the first hidden layer's verdicts showed ten times
        its gain)."""
        if self.config.random or self.config.placement != "residual":
            return set()
        for key in list(self.scored):  # a seed rolled back or evicted leaves without a verdict
            layer, _, index = key.rpartition("#")
            if not self.seeds[layer].slots[int(index)].state.live:
                del self.scored[key]
        judged = set(self.evidence)
        pending = {key.rpartition("#")[0] for key in self.scored}
        return judged if pending - judged else set()

    def _adopt(self, plan: Plan, out: Decisions, layer: str, where: str, merit: float, inputs: dict[str, Any]) -> None:
        note = f"; {plan.note}" if plan.note else ""
        for eviction in plan.evict:
            ref = SlotRef(layer, eviction.index)
            slot = self.seeds[layer].slots[eviction.index]
            reward = self.selector.reward(str(slot.blueprint), self.kinds[layer], eviction.gain, slot.params, True)
            out.culls.append(CullDecision(ref, f"replaced {slot.blueprint} in {ref.key}: {where}{note}",
                                          {"metric_gain": eviction.gain, "reward": reward, "inputs": inputs}))
        for g in plan.reserve:
            self.reserved[SlotRef(layer, g.index).key] = g
        for g in plan.germinate:
            out.germinations.append(self._decision(SlotRef(layer, g.index), g, f"{where}; {g.explanation}{note}",
                                                   merit, inputs))
        self._pending.extend(g.candidate for g in (*plan.germinate, *plan.reserve))

    def _decision(self, ref: SlotRef, g: Germination, why: str, merit: float, inputs: dict[str, Any]) -> GrowthDecision:
        c = g.candidate
        self.scored[ref.key] = self._residual_score(ref.layer)
        choice = {"arm": c.arm, "params": c.params, "flops": c.flops, "prior": c.prior, "latency_ms": c.latency_ms}
        return GrowthDecision(ref, c.blueprint, f"germinated {c.blueprint} in {ref.key}: {why}", merit,
                              inputs | {"choice": choice, "arms": g.arms})

    def _release_reserved(self, out: Decisions) -> None:
        """REPLACE's new choices take their slots once the embargo has reopened them."""
        for key, g in list(self.reserved.items()):
            layer, _, index = key.rpartition("#")
            state = self.seeds[layer].slots[int(index)].state
            if state == SeedState.DORMANT:
                del self.reserved[key]
                inputs = {"choice": {"arm": g.candidate.arm, "params": g.candidate.params}, "arms": g.arms}
                out.germinations.append(GrowthDecision(
                    SlotRef(layer, int(index)), g.candidate.blueprint,
                    f"germinated {g.candidate.blueprint} in {key}: replacement chosen at the cull; {g.explanation}",
                    0.0, inputs))
            elif state not in (SeedState.CULLED, SeedState.ROLLED_BACK):
                del self.reserved[key]  # the slot went another way (a rollback restored it)

    def _skip(self, out: Decisions, code: str, reason: str, inputs: dict[str, Any]) -> Decisions:
        """Report a fired trigger that led nowhere, once per kind of obstacle."""
        if code != self._last_skip:
            self._last_skip = code
            out.skipped = {"reason": reason, "inputs": inputs}
        return out

    # --- the Planner interface (what strategies may ask) --------------------------------------------

    def _has_room(self, layer: str) -> bool:
        """Whether ``layer`` could take a seed once it is not busy: a free slot (or, for ``replace``, a
        seed it may evict) and a blueprint within the budgets."""
        return (bool(self.seeds[layer].free()) or self.strategy.name == "replace") and bool(self.candidates(layer))

    def may_grow(self, seeds: SeedView) -> bool:
        """Whether a later decision could germinate anything with the seeds as they are: not when the
        seed budget is spent or every slot is taken (until a cull or the embargo after it frees one).
        ``replace`` can always make room. The controller measures health only while this holds: a
        measurement that can inform no decision is a per-step cost for nothing (issue 13)."""
        if self.config.max_seeds == 0:
            return False
        if self.strategy.name == "replace":
            return True
        return self._seeds_used(seeds) < self.config.max_seeds and any(layer.free() for layer in seeds.values())

    def busy(self, layer: str) -> bool:
        """A live seed, or a reserved replacement, is under evaluation in ``layer``."""
        return any(s.state.live for s in self.seeds[layer].slots) or \
            any(key.rpartition("#")[0] == layer for key in self.reserved)

    def candidates(self, layer: str, spent: Sequence[Candidate] = (), freed: Sequence[SlotRef] = ()) -> list[Candidate]:
        """The blueprints that may grow on ``layer`` now: right kind, usable kernel, within every budget
        (after ``spent`` candidates of the same plan and without the seeds in ``freed``)."""
        cfg = self.config
        spent = [*self._pending, *spent]  # seeds this decision already chose elsewhere
        if self._seeds_used() + len(spent) - len(freed) >= cfg.max_seeds:
            return []
        params, flops = self._used()
        for ref in freed:
            slot = self.seeds[ref.layer].slots[ref.index]
            params -= slot.params
            flops -= self._cost(str(slot.blueprint), ref.layer).flops
        params += sum(c.params for c in spent)
        flops += sum(c.flops for c in spent)
        kind = self.kinds[layer]
        health = self._health.get(layer)
        out = []
        for blueprint in self.blueprints_for(layer):
            if (layer, blueprint) in self.forbidden:
                continue
            cost = self._cost(blueprint, layer)
            if params + cost.params > cfg.max_added_params:
                continue
            if cfg.max_added_flops is not None and flops + cost.flops > cfg.max_added_flops:
                continue
            latency = self._latency(blueprint, layer)
            if cfg.max_latency_ms is not None and (latency is None or latency > cfg.max_latency_ms):
                continue  # unknown latency (kernel still compiling) is not yet eligible under a limit
            finite = health is not None and health.finite and math.isfinite(health.residual)
            prior = self.eta * health.residual / (cost.params / 1000.0) if finite and cost.params else None
            out.append(Candidate(blueprint, layer, kind, cost.params, cost.flops, latency, prior))
        return out

    def choose(self, candidates: Sequence[Candidate]) -> Choice | None:
        """The selector's choice, offered arms with fewer seeds still awaiting a verdict first: rewards
        arrive late (at the verdict), and an arm already being tried should not be "untried" again."""
        waiting: dict[str, int] = {}
        for name, slot in self._occupied():
            if slot.state.live:
                arm = arm_key(str(slot.blueprint), self.kinds[name])
                waiting[arm] = waiting.get(arm, 0) + 1
        for g in self.reserved.values():
            waiting[g.candidate.arm] = waiting.get(g.candidate.arm, 0) + 1
        if self.config.random and candidates:
            pick = candidates[int(self._rng.integers(len(candidates)))]
            return self.selector.choose([pick])
        return self.selector.choose(sorted(candidates, key=lambda c: waiting.get(c.arm, 0)))

    def champion(self, kind: str) -> tuple[str, ArmStats] | None:
        """The blueprint of ``kind`` with the best mean reward among those with a fossilized seed."""
        best: tuple[str, ArmStats] | None = None
        of_kind = dict.fromkeys(bp for layer, k in self.kinds.items() if k == kind for bp in self.blueprints_for(layer))
        for blueprint in of_kind:
            arm = arm_key(blueprint, kind)
            stats = self.selector.bandit.arms.get(arm)
            if self.kept.get(arm, 0) and stats is not None and (best is None or stats.mean > best[1].mean):
                best = (blueprint, stats)
        return best

    def arm_table(self, candidates: Sequence[Candidate]) -> dict[str, dict[str, float]]:
        return {c.arm: self.selector.describe(c.arm) for c in candidates}

    def measure(self, ref: SlotRef) -> float:
        return self._contributions[ref.key]

    # --- budgets ------------------------------------------------------------------------------------

    def _cost(self, blueprint: str, layer: str) -> SeedCost:
        key = (blueprint, layer)
        if key not in self._costs:
            self._costs[key] = self.cost_of(blueprint, layer)
        return self._costs[key]

    def _latency(self, blueprint: str, layer: str) -> float | None:
        """The kernel's measured latency, or ``None`` while its compile has not finished: the policy
        never waits for a compile."""
        if self.config.max_latency_ms is None or self.latency_of is None:
            return None
        key = (blueprint, layer)
        if key not in self.latency:
            measured = self.latency_of(blueprint, layer)
            if measured is None:
                return None
            self.latency[key] = measured
        return self.latency[key]

    def _occupied(self, seeds: SeedView | None = None) -> Iterator[tuple[str, SlotView]]:
        """Slots holding a seed, in ``seeds`` (default: the view of the current decision)."""
        for name, layer in (self.seeds if seeds is None else seeds).items():
            for slot in layer.slots:
                if slot.holds:
                    yield name, slot

    def _seeds_used(self, seeds: SeedView | None = None) -> int:
        return sum(1 for _ in self._occupied(seeds)) + len(self.reserved)

    def _used(self) -> tuple[int, int]:
        """(parameters, forward FLOPs per sample) of every seed that holds or will hold parameters."""
        params = flops = 0
        for name, slot in self._occupied():
            params += slot.params
            flops += 0 if slot.merged else self._cost(str(slot.blueprint), name).flops
        for key, g in self.reserved.items():
            params += g.candidate.params
            flops += g.candidate.flops
        return params, flops

    def _budget(self) -> dict[str, list[int | None]]:
        params, flops = self._used()
        cfg = self.config
        return {"seeds": [self._seeds_used(), cfg.max_seeds], "params": [params, cfg.max_added_params],
                "flops": [flops, cfg.max_added_flops]}

    # --- feedback -----------------------------------------------------------------------------------

    def verdict(self, slot: SlotView, ref: SlotRef, gain: float, kept: bool) -> dict[str, Any]:
        """Credit a seed's counterfactual metric gain to its arm and to its layer's placement evidence;
        returns fields for the verdict event."""
        kind = self.kinds[ref.layer]
        reward = self.selector.reward(str(slot.blueprint), kind, gain, slot.params, kept)
        arm = arm_key(str(slot.blueprint), kind)
        if kept:
            self.kept[arm] = self.kept.get(arm, 0) + 1
        score = self.scored.pop(ref.key, None)
        if score is not None and math.isfinite(reward):
            self.evidence.setdefault(ref.layer, LayerEvidence()).add(reward, score)
        return {"arm": arm, "reward": reward, "arm_stats": self.selector.describe(arm)}

    def penalise(self, layer: str, blueprint: str | None) -> None:
        """A seed of ``blueprint`` in ``layer`` caused a rollback: its arm is charged the penalty."""
        if blueprint is not None:
            self.selector.rollback(blueprint, self.kinds[layer], self._cost(blueprint, layer).params)

    def forbid(self, layer: str, blueprint: str) -> None:
        """Never choose ``blueprint`` for ``layer`` again in this run (its kernel cannot be built)."""
        self.forbidden.add((layer, blueprint))

    # --- checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"last_growth_step": self.last_growth_step, "signals": self.signals.state_dict(),
                "selector": self.selector.state_dict(), "kept": dict(self.kept),
                "evidence": {layer: e.to_json() for layer, e in self.evidence.items()}, "scored": dict(self.scored),
                "reserved": {k: _germination_json(g) for k, g in self.reserved.items()},
                "forbidden": sorted([layer, bp] for layer, bp in self.forbidden),
                "latency": [[bp, layer, ms] for (bp, layer), ms in self.latency.items()],
                "last_skip": self._last_skip, "random": {"next": self._next_random, "rng": self._rng.bit_generator.state}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_growth_step = state["last_growth_step"]
        self.signals.load_state_dict(state["signals"])
        self.selector.load_state_dict(state["selector"])
        self.kept = dict(state["kept"])
        # checkpoints written before placement learnt from verdicts resume with no evidence
        self.evidence = {layer: LayerEvidence(int(n), float(r), float(sc))
                         for layer, (n, r, sc) in state.get("evidence", {}).items()}
        self.scored = {key: float(v) for key, v in state.get("scored", {}).items()}
        self.reserved = {k: _germination_from_json(v) for k, v in state["reserved"].items()}
        self.forbidden = {(layer, bp) for layer, bp in state["forbidden"]}
        self.latency = {(bp, layer): ms for bp, layer, ms in state["latency"]}
        self._last_skip = state["last_skip"]
        self._next_random = int(state["random"]["next"])
        self._rng.bit_generator.state = state["random"]["rng"]

    def tensor_state(self) -> dict[str, torch.Tensor]:
        """The running layer statistics (device tensors; checkpoints store them with the weights)."""
        return self.layers.state_dict()

    def load_tensor_state(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        self.layers.load_state_dict(tensors, device)


def _germination_json(g: Germination) -> dict[str, Any]:
    c = g.candidate
    return {"index": g.index, "explanation": g.explanation, "arms": g.arms,
            "candidate": [c.blueprint, c.layer, c.kind, c.params, c.flops, c.latency_ms, c.prior]}


def _germination_from_json(data: dict[str, Any]) -> Germination:
    return Germination(data["index"], Candidate(*data["candidate"]), data["explanation"], data["arms"])
