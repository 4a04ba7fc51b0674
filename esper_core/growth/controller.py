"""The growth controller: the one growth engine, driven from the user's loop or by ``esper train``.

A user keeps their model, optimizer, loss, data and loop, and calls the controller at three points::

    growth = GrowthController(model, optimizer, example=x, max_steps=3000, evaluate=evaluate)
    for x, y in batches:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        growth.after_backward()          # health measurement, when one is due
        optimizer.step()
        growth.after_step(loss)          # lifecycle clock, seeds that are ready, verdicts, governor
        if due_for_validation:
            growth.after_validation(evaluate(model))   # plateau signal, snapshot, growth decisions

The controller wraps the chosen layers in Kasmina layers, asks the policy what to grow (through a
read-only view of the seeds), gets kernels without ever blocking a step, adds and removes seed
parameter groups in the user's optimizer, judges seeds counterfactually with the user's ``evaluate``,
and rolls back on a bad loss. ``esper train`` is a loop around this same object.

Its state (:meth:`state_dict`) holds only tensors and JSON values; model weights and optimizer state
are the caller's (see :mod:`esper_core.growth.checkpoint` for saving all three together).
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from esper_core.compiler.store import KernelStore
from esper_core.compiler.worker_start import refuse_during_worker_start
from esper_core.distributed.world import World
from esper_core.errors import CONTROLLER_FIELD, RECIPE_FIELD, ConfigError, EsperError, Problem, one_line
from esper_core.growth import optimizer as optim
from esper_core.growth.catalog import SeedCatalog
from esper_core.growth.evaluation import Evaluate, Evaluation
from esper_core.growth.execution import KernelFailure, SeedExecutor
from esper_core.growth.governor import Governor
from esper_core.growth.kernels import KernelSupply
from esper_core.growth.seed_rate import SeedRate
from esper_core.growth.state import State, cpu_copy
from esper_core.growth.verdicts import Counterfactuals, judge
from esper_core.policy.growth import Decisions, GrowthPolicy
from esper_core.policy.merit import GradientMerit
from esper_core.recipe.diagnostics import Locator, validation_problems
from esper_core.recipe.schema import GovernorConfig, PolicyConfig, SeedsConfig, StorageConfig
from esper_core.seeds.kasmina import KasminaLayer
from esper_core.seeds.lifecycle import SeedState
from esper_core.seeds.manager import Event, SlotRef
from esper_core.seeds.probe import call_model, eval_mode, shapes_of, to_device


class Recorder(Protocol):
    """Where the controller reports: chained events, and background compile timings."""

    def record(self, event: Event) -> None: ...

    def notify(self, event: Event) -> None: ...

    def compiled(self, seconds: float, ok: bool) -> None: ...


class MemoryRecorder:
    """The default recorder of a controller used from a user's own loop: events kept in a list. A loop
    has no display, so a kernel that cannot be compiled (its blueprint will never grow on that layer)
    is also a warning: a script whose every kernel failed would otherwise train without ever growing,
    and exit 0."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.compiles: list[tuple[float, bool]] = []

    def record(self, event: Event) -> None:
        self.events.append(event)
        if event.get("event") == "kernel_failed":
            problems = event.get("problems") or ["no reason given"]
            warnings.warn(f"kernel {event.get('blueprint')} for layer {event.get('layer')} cannot be compiled; that "
                          f"blueprint will not grow there: {problems[0]}", stacklevel=2)

    def notify(self, event: Event) -> None:
        """Notices (not events): nobody listens in a user's own loop."""

    def compiled(self, seconds: float, ok: bool) -> None:
        self.compiles.append((seconds, ok))


@contextmanager
def _as_arguments() -> Iterator[None]:
    """Problems the shared setup code reports against recipe fields (``<recipe>: seeds.targets.0``)
    re-sourced to the controller's arguments of the same names (see ``CONTROLLER_FIELD``)."""
    try:
        yield
    except ConfigError as error:
        raise ConfigError([replace(p, source=CONTROLLER_FIELD) if p.source == RECIPE_FIELD else p
                           for p in error.problems]) from error.__cause__


@dataclass(frozen=True)
class StepOutcome:
    """What :meth:`GrowthController.after_step` did: the loss value it read (on check steps, else
    ``None``), and whether the governor rolled the run back."""

    loss: float | None
    rolled_back: bool


def _check_example(model: nn.Module, example: Any) -> None:
    """One eval-mode, no-grad forward pass of ``example``, before anything is wrapped. The controller
    learns each layer's input shape from it; an example that does not fit the model (a wrong feature
    count, an image for an MLP) otherwise failed inside the wrapped model as torch's own traceback,
    and left the model wrapped, so a second try with the right example was refused as well."""
    try:
        with torch.no_grad(), eval_mode(model):
            call_model(model, to_device(example, next(model.parameters()).device))
    except Exception as error:  # whatever the model's own code raises; kept as the cause
        raise ConfigError(Problem(CONTROLLER_FIELD, f"the model cannot run an example of shape "
                                  f"{shapes_of(example)}: {one_line(error)}", field="example")) from error


def _check_optimizer(model: nn.Module, optimizer: Any) -> None:
    """Refuse an optimizer growth cannot work with, before anything is changed."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or None, bound later), "
                        f"not {type(optimizer).__name__}")
    ours = {id(p) for p in model.parameters()}
    strays = sum(id(p) not in ours for g in optimizer.param_groups for p in g["params"])
    if strays:
        raise ValueError(f"the optimizer holds {strays} parameter(s) that are not the model's: growth saves and "
                         "restores optimizer state by the model's parameter names, so every parameter it trains "
                         "must be registered on the model (e.g. a learnable loss weight as an nn.Parameter attribute "
                         "of it)")


def _check_evaluate(evaluate: Any, said: str) -> None:
    """Refuse an ``evaluate`` that is not a function now: it is first called at a verdict, many steps later."""
    if evaluate is not None and not callable(evaluate):
        raise TypeError(f"{said} a function of the model that returns an esper_core.Evaluation, "
                        f"not {type(evaluate).__name__}")


def check_max_norm(max_norm: Any, said: str) -> float:
    """A clipping norm, refused where it is given: torch's clipping failed on a string or ``None`` only
    at the first step, from inside its own code."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
        raise TypeError(f"{said}: the largest gradient norm, a positive number, not {type(max_norm).__name__}")
    if not max_norm > 0:
        raise ValueError(f"{said}: the largest gradient norm, a positive number, not {max_norm!r}")
    return float(max_norm)


def _check_tools(store: Any, scaler: Any) -> None:
    """Refuse a kernel store or loss scaler of the wrong type now: a scaler is first used inside
    autograd's backward at the first incubating seed, many steps later, and a store inside the kernel
    supply; both failed there with an ``AttributeError`` that named neither argument."""
    if store is not None and not all(callable(getattr(store, name, None)) for name in ("get", "put")):
        raise TypeError("store must be a kernel store (esper_core.storage.open_kernel_store(StorageConfig(...)), "
                        f"or None for .esper/ in the working directory), not {type(store).__name__}")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler (or None), not {type(scaler).__name__}")


def _blueprint_dirs(given: Sequence[str | Path], seeds: SeedsConfig) -> list[Path]:
    """The directories of the user's own blueprints: the ``blueprint_dirs`` argument, else the
    ``seeds.blueprint_dirs`` key (relative to the working directory, as any path in a script is).
    The key was ignored, so a blueprint named there was "unknown"; and strings reached the library,
    which failed on them with an ``AttributeError``."""
    if isinstance(given, (str, Path)) or not isinstance(given, (list, tuple)):
        raise TypeError(f"blueprint_dirs must be a list of directories (blueprint_dirs=[{str(given)!r}]), "
                        f"not {type(given).__name__}")
    return [Path(directory) for directory in (given or seeds.blueprint_dirs)]


def _config(cls: type[BaseModel], value: Any, argument: str) -> Any:
    """A recipe section given as the model or as a dict; a dict's mistakes are one ConfigError naming
    each field as ``argument.field`` (as a recipe's would be), not pydantic's raw report."""
    if isinstance(value, cls):
        return value
    try:
        return cls.model_validate(value or {})
    except ValidationError as exc:
        problems = validation_problems(exc, Locator(CONTROLLER_FIELD, {}, ()), cls)
        raise ConfigError([replace(p, field=f"{argument}.{p.field}" if p.field else argument)
                           for p in problems]) from None


class GrowthController:
    """See the module docstring.

    ``example`` is one input of the model as the loop passes it (a tensor, a tuple of arguments or a
    dict of keyword arguments): it is run once to learn the shape each wrapped layer really sees.
    ``evaluate(model)`` must evaluate the same held-out samples every call (verdicts compare two
    calls); it may also be given later, to :meth:`after_validation`. ``seed_lr(step)`` is the learning
    rate of seed parameters (default: the optimizer's first group's learning rate when it is bound,
    times ``seeds.lr_scale``). ``run_state`` is a pair (capture, restore) of the whole run's state for
    the governor's snapshots; by default model, optimizer and controller. ``optimizer`` may be
    ``None`` and bound later with :meth:`bind_optimizer` (a framework that creates it after setup).
    Binding adds the seed group to the optimizer at once, so a learning-rate scheduler built after
    the controller covers it; pass one built before as ``schedulers`` (it is extended to cover it).
    ``scaler``: the ``torch.amp.GradScaler`` the loop scales its loss with (fp16), so an incubating
    seed's pull is scaled like the gradient it joins. ``accumulate_steps``: micro-batches per
    optimizer step when the loop divides each micro-batch's loss by their number (the pull is divided
    the same way). ``world`` (from :func:`esper_core.distributed.join`) makes every rank's controller
    take the same decisions at the same steps: measurements and loss reads are reduced over the ranks, kernels are
    all ready before the first step, and ``evaluate`` must reduce over the ranks too (see
    :mod:`esper_core.distributed`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, example: Any, max_steps: int,
                 seeds: SeedsConfig | dict[str, Any] | None = None,
                 policy: PolicyConfig | dict[str, Any] | None = None,
                 governor: GovernorConfig | dict[str, Any] | None = None,
                 store: KernelStore | None = None, seed: int = 0, evaluate: Evaluate | None = None,
                 recorder: Recorder | None = None, check_every: int = 10,
                 seed_lr: Callable[[int], float] | None = None, blueprint_dirs: Sequence[str | Path] = (),
                 deterministic: bool = True, start: bool = True, kernel_dtype: str | None = None,
                 world: World | None = None, schedulers: Sequence[Any] = (),
                 scaler: torch.amp.GradScaler | None = None, accumulate_steps: int = 1) -> None:
        refuse_during_worker_start()  # both front doors start here; see its docstring
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if next(model.parameters(), None) is None:
            raise TypeError("model has no parameters: growth adds seeds beside its layers (Linear, Conv1d, Conv2d), "
                            "and this model has none")
        # every argument is checked before the model is wrapped: a refused call changes nothing
        if optimizer is not None:
            _check_optimizer(model, optimizer)
        for argument, value, unit in (("max_steps", max_steps, "optimizer steps"),
                                      ("accumulate_steps", accumulate_steps, "micro-batches"),
                                      ("check_every", check_every, "steps")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{argument} must be a positive number of {unit}, not {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, not {seed!r}")
        _check_evaluate(evaluate, "evaluate must be")
        _check_tools(store, scaler)
        self.model = model
        self.optimizer = optimizer
        self.max_steps = max_steps
        self.seeds_config: SeedsConfig = _config(SeedsConfig, seeds, "seeds")
        self.policy_config: PolicyConfig = _config(PolicyConfig, policy, "policy")
        governor_config: GovernorConfig = _config(GovernorConfig, governor, "governor")
        directories = _blueprint_dirs(blueprint_dirs, self.seeds_config)
        self.evaluate = evaluate
        self.recorder: Recorder = recorder or MemoryRecorder()
        self.check_every = check_every
        self.deterministic = deterministic
        self.world = world
        self.device = next(model.parameters()).device
        _check_example(model, example)
        with _as_arguments():
            self.manager, self.catalog = SeedCatalog.of_model(model, self.seeds_config, example, directories,
                                                              self.device.type, kernel_dtype)
        for layer in self.manager.layers.values():
            # a loop that divides each micro-batch's loss by their number sums that many pulls: an
            # eta as many times larger keeps the pull's minimiser where one full batch puts it
            layer.eta = self.seeds_config.eta * accumulate_steps
            layer.grad_scaler = scaler
        if store is None:
            from esper_core.storage import open_kernel_store
            store = open_kernel_store(StorageConfig())
        self.kernels = KernelSupply(store, on_compiled=self.recorder.compiled)
        self.merit = GradientMerit(self.policy_config.merit_decay)
        self.policy = GrowthPolicy(self.policy_config, max_steps,
                                   {name: layer.spec.kind for name, layer in self.manager.layers.items()},
                                   self.catalog.blueprints_for, self.catalog.cost, seed=seed,
                                   eta=self.seeds_config.eta,
                                   latency_of=lambda bp, layer: self.kernels.latency_ms(self.catalog.spec(bp, layer)))
        if world is not None:
            self.policy.layers.share(world.mean)
        self.governor = Governor(governor_config, self.device)
        self._seed_lr = seed_lr
        # a run that can never grow has no seeds to slow down: no switch, no `seed_lr` event
        self.seed_rate = SeedRate(self.seeds_config.lr_schedule == "adaptive" and self.policy_config.max_seeds > 0,
                                  self.policy_config.trend_window)
        self.executor = SeedExecutor(self.manager, None, self.catalog, self.kernels, self._lr_of_seeds, seed,
                                     self.seeds_config.merge_linear)
        self.run_state: tuple[Callable[[], State], Callable[[State], None]] = (self._capture, self._restore)
        self._names = {id(layer): name for name, layer in self.manager.layers.items()}
        self._unusable: set[tuple[str, str]] = set()
        self._gate_open = True
        self._previous_loss: float | None = None
        self._last_loss: torch.Tensor | None = None
        self._measuring = False
        self._arming_restored = False  # a loaded state says whether the next pass is measured
        self.kernel_wait_s = 0.0
        self.started = False
        self._warned: set[str] = set()  # misuses of the own-loop calls already warned about (once each)
        with self.manager.unwrapped_on_failure():  # a refused optimizer or scheduler changes nothing either
            if optimizer is not None:
                self.bind_optimizer(optimizer, schedulers)
            if start:
                self.start()

    # --- the public surface -----------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Optimizer steps taken (every lifecycle counter counts these)."""
        return self.manager.step_count

    def bind_optimizer(self, optimizer: torch.optim.Optimizer, schedulers: Sequence[Any] = ()) -> None:
        """Use ``optimizer`` from now on: its seed group is added now (seeds that already exist join
        it; none when ``policy.max_seeds`` is 0), and ``schedulers`` built on it before are extended to
        cover that group."""
        _check_optimizer(self.model, optimizer)
        if not isinstance(schedulers, (list, tuple)):
            raise TypeError("schedulers must be a list of the learning-rate schedulers built on the optimizer before "
                            f"the controller (schedulers=[scheduler]), not {type(schedulers).__name__}")
        if optim.has_scheduler(optimizer) and not schedulers:
            warnings.warn("a learning-rate scheduler was built on this optimizer before the growth controller: pass it "
                          "as schedulers=[...] (or build it after the controller) so it covers the seeds' parameter "
                          "group; LambdaLR, OneCycleLR, CyclicLR and ReduceLROnPlateau fail without", stacklevel=2)
        self.optimizer = optimizer
        if self._seed_lr is None:  # constant: the user's scheduler owns the host's learning rate
            self._constant_seed_lr = float(optimizer.param_groups[0]["lr"]) * self.seeds_config.lr_scale
        self.executor.bind(optimizer, grows=self.policy_config.max_seeds > 0)
        optim.cover_schedulers(optimizer, schedulers)
        self.executor.set_lr(self.step)

    def _warn_once(self, kind: str, message: str) -> None:
        """A wiring mistake in the user's loop that growth can see, said once (a UserWarning)."""
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, stacklevel=3)

    def _lr_of_seeds(self, step: int) -> float:
        own = self._seed_lr(step) if self._seed_lr is not None else self._constant_seed_lr
        return self.seed_rate.rate(own)

    def start(self) -> None:
        """Request every kernel this run can use; with ``deterministic`` wait for them, so the step at
        which a seed starts never depends on compile speed. Called by the constructor unless
        ``start=False`` (``esper train`` records its first event before)."""
        if self.started:
            return
        self.started = True
        specs = self.catalog.affordable_specs(self.policy_config) if self.policy_config.max_seeds > 0 else {}

        def request() -> set[str]:
            """Ask for every kernel; returns the addresses not in the store (being compiled)."""
            return {spec.address() for spec in specs.values() if not self.kernels.request(spec).done()}

        if (self.deterministic or self.world is not None) and specs:  # ranks must not wait for different seeds
            began = time.perf_counter()
            # rank 0 requests and compiles alone; the others request once it is done, and find its kernels
            # in the shared store (requested before, each rank compiled every kernel itself)
            with self.world.leader_first() if self.world is not None else nullcontext():
                compiling = request()
                if compiling:  # a notice, not an event: a first run's wait takes seconds, not a hang
                    self.recorder.notify({"event": "kernels_compiling", "step": self.step, "kernels": len(compiling)})
                errors = self.kernels.wait(specs.values())
            for (layer, blueprint), spec in specs.items():
                error = errors[spec.address()]
                if error is not None:
                    self._kernel_failed(KernelFailure(layer, blueprint, error))
            self.kernel_wait_s = time.perf_counter() - began
            self._record({"event": "kernels_ready", "step": self.step,
                          "kernels": len({s.address() for s in specs.values()}),
                          "unusable": sorted(f"{layer}:{bp}" for layer, bp in self._unusable),
                          "seconds": round(self.kernel_wait_s, 3)})
        else:
            request()  # in the background: a seed starts when its kernel has arrived
        if not self._arming_restored:
            self._arm_if_due()

    def after_backward(self) -> None:
        """Call after ``loss.backward()`` and before ``optimizer.step()``: reads the host gradients
        when this step was measured. Sets the seed group's learning rate for the coming step (a user's
        scheduler may have written its own value there)."""
        self.executor.set_lr(self.step)
        if self._measuring:
            if not any(layer.host.weight.grad is not None for layer in self.manager.layers.values()):
                self._warn_once("no_grads", "after_backward() found no gradients on the wrapped layers: call it after "
                                "loss.backward() and before optimizer.zero_grad(), or placement by gradient merit "
                                "sees nothing")
            self.merit.observe(self.manager)  # DDP has averaged the gradients already
            if self.world is not None:
                self.policy.layers.flush()  # the collective fold, on every rank at this same point
            self._disarm()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip gradients without letting an incubating seed change the host's update: the host (and
        every seed that already contributes) and each incubating seed are clipped separately.
        Returns the host's gradient norm before clipping."""
        max_norm = check_max_norm(max_norm, "clip_grad_norm_(max_norm)")
        incubating = {id(p) for ref, layer in self.manager.slots()
                      if layer.slots[ref.index].state == SeedState.TRAINING and str(ref.index) in layer.seeds
                      for p in layer.seed_module(ref.index).parameters()}
        host = [p for p in self.model.parameters() if id(p) not in incubating]
        norm = torch.nn.utils.clip_grad_norm_(host, max_norm)
        for ref, layer in self.manager.slots():
            if layer.slots[ref.index].state == SeedState.TRAINING and str(ref.index) in layer.seeds:
                torch.nn.utils.clip_grad_norm_(list(layer.seed_module(ref.index).parameters()), max_norm)
        return norm

    def after_step(self, loss: torch.Tensor | None = None) -> StepOutcome:
        """Call after ``optimizer.step()`` with the step's loss (a tensor; read only every
        ``check_every`` steps). Advances every seed's clock, starts seeds whose kernel arrived, judges
        seeds whose probation is over, and lets the governor roll back a bad loss."""
        loss = _step_loss(loss)  # checked before the clock moves: a refused call changes nothing
        if self._measuring:  # armed for the pass of this step, and nothing read its gradients
            self._warn_once("no_after_backward", "after_backward() was not called between loss.backward() and "
                            "optimizer.step() on a step growth measures: the layers' health goes unmeasured")
        for event in self.manager.step(self._gate_open):
            self._record(event)
        self._activate_ready()
        due = self.manager.due_for_verdict()
        if due and self.evaluate is not None:
            judged = Counterfactuals(self.model, self.evaluate)
            for ref in due:
                self._verdict(ref, judged)
        elif due:
            self._warn_once("no_evaluate", f"{len(due)} seed(s) finished probation, but the growth controller has "
                            "no evaluate function to judge them: they stay in probation (holding their slots) until "
                            "one is given (GrowthController(evaluate=...) or after_validation(evaluate=...))")
        value, rolled_back = None, False
        if loss is not None:
            self.governor.watch(loss)
            self._last_loss = loss.detach()
            if self.step % self.check_every == 0 or self.step == self.max_steps:
                value = self._read(loss)  # the only per-step sync, every check_every steps
                rolled_back = self._govern(value)
                if not rolled_back:
                    self._update_gate(value)
                    self.policy.observe_train(self.step, value)
        host = optim.host_group(self.optimizer)
        if host is not None:
            self.seed_rate.observe_host(float(host["lr"]))
        self.executor.set_lr(self.step)
        self._arm_if_due()
        return StepOutcome(value, rolled_back)

    def after_validation(self, evaluation: Evaluation | None = None, evaluate: Evaluate | None = None) -> bool:
        """Call after a validation pass with its result (the plateau signal); ``evaluate``, if given,
        becomes the function verdicts use. Takes the governor's known-good snapshot and, inside the
        growth window, carries out the policy's decisions. Returns whether the governor rolled back
        instead."""
        if evaluation is not None and not isinstance(evaluation, Evaluation):
            raise TypeError(f"after_validation(evaluation): an esper_core.Evaluation (or None), "
                            f"not {type(evaluation).__name__}")
        if evaluate is not None:
            _check_evaluate(evaluate, "after_validation(evaluate=...):")
            self.evaluate = evaluate
        if self.governor.enabled:
            # The validation pass ran the very state a snapshot would keep: judge it before keeping it.
            reason = _non_finite(evaluation)
            if reason is None and self.governor.judged_step != self.step and self._last_loss is not None:
                reason = self.governor.judge(self.step, self._read(self._last_loss))
            if reason is not None:
                self._roll_back(reason)
                return True
            if evaluation is not None:
                self.governor.judged_step = self.step
        if evaluation is not None:
            self.policy.observe_validation(self.step, evaluation.loss, -evaluation.better())
            switched = self.seed_rate.observe_validation(self.step, -evaluation.better(), evaluation.name)
            if switched is not None:
                self.executor.set_lr(self.step)
                self._record(switched)
        if self.governor.enabled:
            self.governor.keep(self.step, self.run_state[0]())
        if not self.policy.in_window(self.step):
            return False
        contributions = {}
        if self.evaluate is not None:
            measure = Counterfactuals(self.model, self.evaluate)  # nothing changes the model between them
            for ref in self.policy.to_measure(self.step, self.manager.view()):
                contributions[ref.key] = measure.of(self.manager.layers[ref.layer], ref.index).metric_gain
        self._execute(self.policy.decide(self.step, self.manager.view(), self.merit.scores(), contributions))
        return False

    def added_parameters(self) -> int:
        return self.manager.added_params()

    # --- state ------------------------------------------------------------------------------------

    def topology_lasts(self) -> bool:
        """Whether the seeds in the model now stay as they are unless a slot frees up: none is live,
        and no decision can germinate another (the growth window is over, or the seed budget or every
        slot is spent). What a deterministic compiled run compiles besides its dormant start."""
        view = self.manager.view()
        if any(slot.state.live for layer in view.values() for slot in layer.slots):
            return False
        return self.policy.window_over(self.step) or not self.policy.may_grow(view)

    def state_dict(self, governor: bool = True) -> State:
        """Everything the controller needs to continue exactly (tensors and JSON values only). The
        governor's part (its snapshot included) is left out of the snapshots it takes itself."""
        state: State = {
            "topology": self.manager.topology(),
            "groups": self.executor.group_order(),
            "policy": self.policy.state_dict(),
            "signals": self.policy.tensor_state(),
            "merit": self.merit.state_dict(),
            "gate": {"open": self._gate_open, "previous_loss": self._previous_loss},
            "seed_rate": self.seed_rate.state_dict(),
            "measuring": self._measuring,
            "unusable": sorted([layer, bp] for layer, bp in self._unusable),
        }
        if governor:
            state["governor"] = self.governor.state_dict()
        return state

    def load_state_dict(self, state: State) -> None:
        """Rebuild the recorded seeds (modules and optimizer groups, in the recorded order) and restore
        every component. Load the model's weights and the optimizer's state after this."""
        self._disarm()
        self.executor.rebuild(state["topology"], list(state["groups"]))
        self.policy.load_state_dict(state["policy"])
        self.policy.load_tensor_state(state["signals"], self.device)
        self.merit.load_state_dict(state["merit"], self.device)
        self._gate_open = bool(state["gate"]["open"])
        self._previous_loss = state["gate"]["previous_loss"]
        self._unusable = {(str(layer), str(bp)) for layer, bp in state["unusable"]}
        self.seed_rate.load_state_dict(state.get("seed_rate"))
        if "governor" in state:
            self.governor.load_state_dict(state["governor"])
        self.executor.set_lr(self.step)
        # Whether the next forward pass is measured was decided in after_step, before this step's
        # validation could germinate and change what may grow: restore that decision rather than
        # take it again (a checkpoint from before this was recorded decides afresh).
        if state.get("measuring") is None:
            self._arm_if_due()
        elif state["measuring"]:
            self._arm()
        self._arming_restored = True

    def check_snapshot(self, state: State) -> None:
        """Restore the governor's snapshot that ``state`` (a checkpoint's controller state) holds, the
        way a rollback would, so that a snapshot that does not fit the model fails while the checkpoint
        is loaded rather than at a rollback in the middle of training. The caller then restores the
        checkpoint's own state over it."""
        snapshot = (state.get("governor") or {}).get("snapshot")
        if snapshot is not None:
            self.run_state[1](snapshot)

    def close(self) -> None:
        """Stop the background compile worker, if one was started."""
        self.kernels.close()

    # --- internals --------------------------------------------------------------------------------

    def _capture(self) -> State:
        return cpu_copy({"model": dict(self.model.state_dict()),
                         "optimizer": optim.export_state(self.optimizer, self.model),
                         "controller": self.state_dict(governor=False)})

    def _restore(self, state: State) -> None:
        self.load_state_dict(state["controller"])
        self.model.load_state_dict(state["model"], strict=True)
        optim.import_state(self.optimizer, self.model, state["optimizer"])

    def _read(self, loss: torch.Tensor) -> float:
        """A loss as the decisions see it: under torchrun the mean over the ranks, with the governor's
        non-finite flag agreed first."""
        if self.world is None:
            return float(loss.detach())
        self.governor.agree(self.world.any_tensor)
        return float(self.world.mean(loss))

    def _record(self, event: Event) -> None:
        self.governor.noticed(event)
        self.recorder.record(event)

    def _arm_if_due(self) -> None:
        """Measure health on the next forward pass when a measurement is due at this step."""
        every = self.policy_config.merit_every
        if self.step % every == 0 and self.policy.in_window(self.step + every) and \
                self.policy.may_grow(self.manager.view()):  # else a measurement would inform no decision
            self._arm()

    def _arm(self) -> None:
        for layer in self.manager.layers.values():
            layer.probe = self._probe  # runs in the eager seed path, also under torch.compile
        self._measuring = True

    def _disarm(self) -> None:
        for layer in self.manager.layers.values():
            layer.probe = None
        self._measuring = False

    def _probe(self, layer: KasminaLayer, x: torch.Tensor, y: torch.Tensor) -> None:
        self.policy.layers.observe_forward(self._names[id(layer)], layer, x, y)

    def _update_gate(self, loss_value: float) -> None:
        """The gated blend schedule advances only while the read training loss is not rising."""
        previous = self._previous_loss
        self._gate_open = previous is None or loss_value <= previous * 1.05
        self._previous_loss = loss_value

    def _activate_ready(self) -> None:
        events, failures = self.executor.activate_ready()
        for failure in failures:
            self._kernel_failed(failure)
        for event in events:
            self._record(event)

    def _kernel_failed(self, failure: KernelFailure) -> None:
        """A kernel that cannot be compiled: the policy moves on to other choices for that layer."""
        key = (failure.layer, failure.blueprint)
        if key in self._unusable:
            return
        self._unusable.add(key)
        self.policy.forbid(*key)
        problems = getattr(failure.error, "problems", None) or [failure.error]
        self._record({"event": "kernel_failed", "step": self.step, "layer": failure.layer, "slot": None,
                      "blueprint": failure.blueprint, "problems": [str(p) for p in problems]})

    def _verdict(self, ref: SlotRef, judged: Counterfactuals) -> None:
        """Counterfactual evaluation in the task's metric (:mod:`esper_core.growth.verdicts`)."""
        result = judged.of(self.manager.layers[ref.layer], ref.index)
        cfg = self.seeds_config
        kept, evidence = judge(result, cfg.fossilize_margin, cfg.verdict_confidence, cfg.loss_guard)
        slot = self.manager.view()[ref.layer].slots[ref.index]
        evidence |= self.policy.verdict(slot, ref, evidence["metric_gain"], kept)  # the selector's reward
        if kept:
            self._record(self.executor.fossilize(ref, **evidence))
        else:
            self._record(self.executor.remove(ref, rolled_back=False, **evidence))
            judged.changed()

    def _execute(self, decisions: Decisions) -> None:
        """Carry out the policy's decisions: culls first (they make room), then germinations."""
        for cull in decisions.culls:
            self._record(self.executor.remove(cull.slot, rolled_back=False, reason=cull.reason, **cull.evidence))
        for decision in decisions.germinations:
            self._record(self.executor.germinate(decision))
            self._activate_ready()
        if decisions.skipped is not None:
            self._record({"event": "growth_skipped", "step": self.step, **decisions.skipped})

    def _govern(self, loss_value: float) -> bool:
        """Roll back if the governor objects; returns whether it did."""
        reason = self.governor.judge(self.step, loss_value)
        if reason is None:
            return False
        self._roll_back(reason)
        return True

    def _roll_back(self, reason: str) -> None:
        """Back to the governor's known-good snapshot; the seeds changed last (at one step) are rolled
        back with it and their blueprints charged the rollback penalty."""
        broken = self.policy.layers.nonfinite_layers()  # where measured activations went non-finite, if seen
        self._record({"event": "anomaly", "step": self.step, "kind": "loss", "reason": reason,
                      **({"nonfinite_layers": broken} if broken else {})})
        if self.governor.snapshot is None:
            raise EsperError(f"governor: {reason} at step {self.step}, and there is no good state to roll back to")
        self.governor.rolled_back()
        suspects, from_step = list(self.governor.suspects), self.step
        # Their blueprints as they are now: the snapshot may predate the seeds (then their slots are
        # dormant after the restore), and the penalty must come after it (the snapshot holds the
        # selector's statistics too). Once per layer and blueprint, however many seeds shared it.
        blamed = dict.fromkeys((ref.layer, self.manager.layers[ref.layer].slots[ref.index].blueprint)
                               for ref in suspects)
        self.run_state[1](self.governor.snapshot)
        evidence: dict[str, Any] = {"reason": reason, "from_step": from_step}
        removed = False
        for layer_name, blueprint in blamed:
            self.policy.penalise(layer_name, blueprint)
        for ref in suspects:
            layer = self.manager.layers[ref.layer]
            if str(ref.index) in layer.seeds and self.manager.state(ref).live:
                self._record(self.executor.remove(ref, rolled_back=True, **evidence))
                removed = True
        if not removed:
            self._record({"event": "rollback", "step": self.step, **evidence})


def _step_loss(loss: torch.Tensor | float | None) -> torch.Tensor | None:
    """The loss given to ``after_step`` as a one-element tensor (the governor adds it up on the device)."""
    if loss is None:
        return None
    if not isinstance(loss, torch.Tensor):
        if isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise TypeError(f"after_step(loss): the step's loss as a tensor (or a number), not {type(loss).__name__}")
        return torch.tensor(float(loss))
    if loss.dim() == 0:  # as it comes from a mean: a reshape would add a view (and an autograd node) per step
        return loss
    if loss.numel() != 1:
        raise ValueError(f"after_step(loss): the step's loss is one number, not a tensor of shape {tuple(loss.shape)} "
                         "(pass the value you called backward on, e.g. loss.mean())")
    return loss.reshape(())


def _non_finite(evaluation: Evaluation | None) -> str | None:
    """Why a validation result shows a broken model (non-finite loss or metric), or ``None``."""
    if evaluation is None:
        return None
    values = {"loss": evaluation.loss, evaluation.name: evaluation.metric}
    bad = {k: v for k, v in values.items() if v is not None and not math.isfinite(v)}
    return f"non-finite validation {', '.join(f'{k} ({v})' for k, v in bad.items())}" if bad else None
