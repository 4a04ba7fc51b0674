"""Tolaria, the training loop: recipe -> data, model, seeds -> steps, growth, verdicts -> run directory.

Data flows one way. The trainer asks the policy what to grow, builds the kernel, tells the
SeedManager to execute, updates the optimizer through :mod:`.optim`, and records everything in the
run directory. Per-step work outside the forward/backward is kept free of host-device syncs: the
loss is read only every ``log_every`` steps and gradient merit only every ``merit_every`` steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from esper_core.blueprints.builder import ResolveError
from esper_core.checkpoints import store
from esper_core.blueprints.library import BlueprintLibrary
from esper_core.compiler.artifact import Kernel
from esper_core.compiler.kernels import KernelSpec
from esper_core.compiler.service import CompileService
from esper_core.compiler.targets import layer_input_shapes
from esper_core.storage import open_kernel_store
from esper_core.errors import RECIPE_FIELD, ConfigError, EsperError, Problem
from esper_core.compiler.flops import analytic_cost
from esper_core.policy.arm_store import workspace_store
from esper_core.policy.growth import Decisions, GrowthDecision, GrowthPolicy, SeedCost
from esper_core.policy.merit import GradientMerit
from esper_core.recipe.load import LoadedRecipe, load_recipe
from esper_core.recipe.overrides import COMMAND_LINE
from esper_core.seeds.manager import Event, SeedManager, SlotRef, wrap
from esper_core.telemetry.jsonl import EventLog, JsonlWriter
from esper_core.telemetry.run import RunTelemetry
from esper_core.training import optim, snapshot
from esper_core.training.batches import EpochSampler, ordered_batches
from esper_core.training.data import build_data
from esper_core.training.evaluate import Scores, counterfactual, evaluate
from esper_core.training.governor import Governor
from esper_core.training.models import build_model, count_parameters


@dataclass(frozen=True)
class Progress:
    """What a progress display shows; sent every ``log_every`` steps and on every event."""

    step: int
    max_steps: int
    loss: float
    val_loss: float | None
    val_accuracy: float | None
    params: int
    seeds: dict[str, int]
    elapsed_s: float
    last_event: str | None = None


ProgressCallback = Callable[[Progress], None]


def select_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise EsperError("run.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed every generator; on CUDA also ask for deterministic kernels. PyTorch's CPU kernels used
    here are deterministic already (the bit-exact resume tests run on the CPU without the flag), and
    setting the flag imports torch's compiler stack, about two seconds of every start-up."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS's first use
        torch.use_deterministic_algorithms(deterministic, warn_only=True)


def describe(event: Event) -> str:
    text = f"step {event['step']}: {event['event']} {event.get('blueprint') or ''} in {event['layer']}#{event['slot']}"
    return " ".join(text.split())


RESUMABLE_OVERRIDES = ("trainer.max_steps", "checkpoint.", "telemetry.")
"""Keys an override may change at resume; anything else would make the continuation a different run."""


@dataclass
class Trainer:
    """One run of one recipe. Build with :meth:`from_recipe` or :meth:`resume`; :meth:`fit` trains
    and returns the summary."""

    loaded: LoadedRecipe
    base_dir: Path | None = None  # directory relative recipe paths resolve against
    device: torch.device = field(init=False)

    @classmethod
    def from_recipe(cls, path: str | Path, overrides: Sequence[str] = ()) -> "Trainer":
        return cls(load_recipe(path, overrides))

    @classmethod
    def resume(cls, target: str | Path, overrides: Sequence[str] = (), strict: bool = False,
               warn: Callable[[str], None] = lambda message: print(message, file=sys.stderr)) -> "Trainer":
        """Rebuild a run from its newest verified checkpoint (or the one named) and continue it."""
        bad = [o for o in overrides if not o.split("=", 1)[0].startswith(RESUMABLE_OVERRIDES)]
        if bad:
            raise ConfigError([Problem(COMMAND_LINE, f"override {o!r} cannot change at resume (allowed: "
                                       f"trainer.max_steps, checkpoint.*, telemetry.*)") for o in bad])
        checkpoint = store.find(Path(target), strict, warn)
        run_dir = checkpoint.path.parent.parent
        saved = run_dir / "recipe.yaml"
        recorded = checkpoint.manifest.get("recipe_sha256")
        if not saved.is_file() or hashlib.sha256(saved.read_bytes()).hexdigest() != recorded:
            raise EsperError(Problem(str(saved), "missing or does not match the recipe hash in the checkpoint"))
        trainer = cls(load_recipe(saved, overrides), Path(checkpoint.state["recipe_dir"]))
        snapshot.restore(trainer, checkpoint.tensors, checkpoint.state)
        trainer.governor.load_state_dict(checkpoint.state["governor"])
        trainer.run_dir = run_dir
        trainer._resumed_from = checkpoint
        return trainer

    def __post_init__(self) -> None:
        recipe = self.loaded.recipe
        self.base_dir = self.base_dir or self.loaded.path.parent
        self.device = select_device(recipe.run.device)
        seed_everything(recipe.run.seed, recipe.run.deterministic, self.device)
        try:
            self.data = build_data(recipe.data, recipe.run.seed, self.base_dir)
            self.model = build_model(recipe.model, self.data.input_shape, self.data.num_classes)
            self.manager: SeedManager = wrap(self.model, config=recipe.seeds)
        except ConfigError as exc:
            raise ConfigError([self.loaded.locate(p.field, p.message) if p.source == RECIPE_FIELD and p.field else p
                               for p in exc.problems]) from None
        self.params_initial = count_parameters(self.model)
        self.input_shapes = layer_input_shapes(self.model, list(self.manager.layers), self.data.input_shape)
        self.model.to(self.device)
        try:
            self.kernel_store = open_kernel_store(recipe.storage)
        except ConfigError as exc:
            raise ConfigError([self.loaded.locate(p.field, p.message) if p.source == RECIPE_FIELD and p.field else p
                               for p in exc.problems]) from None
        self._compiler: CompileService | None = None  # started on the first store miss
        self._kernel_futures: dict[str, Future[Kernel]] = {}  # address -> kernel
        self._compile_started: dict[str, float] = {}  # address -> when its compile was requested
        self._compile_done: dict[str, float] = {}  # address -> when the worker delivered it
        self._unusable: set[tuple[str, str]] = set()  # (layer, blueprint) whose kernel failed to compile
        self.kernel_wait_s = 0.0  # spent before step 1 waiting for kernels (deterministic runs)
        self.blocked_steps = 0  # training steps that waited on a compile
        self.library = BlueprintLibrary.discover(self.base_dir / d if not Path(d).is_absolute() else Path(d)
                                                 for d in recipe.seeds.blueprint_dirs)
        self._check_blueprints()
        self.optimizer = optim.build_optimizer(self.model, recipe.trainer)
        self.merit = GradientMerit(recipe.policy.merit_decay)
        self.policy = GrowthPolicy(recipe.policy, recipe.trainer.max_steps,
                                   {name: layer.spec.kind for name, layer in self.manager.layers.items()},
                                   self._blueprints_for, self._seed_cost, seed=recipe.run.seed, eta=recipe.seeds.eta,
                                   latency_of=self._seed_latency)
        self.governor = Governor(recipe.trainer.governor, self.device)
        self.sampler = EpochSampler(self.data.train, recipe.data.batch_size, recipe.run.seed)
        self.val_batches = list(ordered_batches(self.data.val, recipe.data.eval_batch_size))
        self.verdict_batches = list(ordered_batches(self.data.val, recipe.data.eval_batch_size,
                                                    limit=recipe.seeds.eval_batches))
        self.step = 0
        self.last_val: Scores | None = None
        self.run_dir: Path | None = None
        self._resumed_from: store.Checkpoint | None = None
        self._gate_open = True
        self._previous_logged_loss: float | None = None
        self._last_changed: SlotRef | None = None
        self._snapshot: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
        self._stop_signal: int | None = None
        self._mirror_failed = False

    # --- blueprints --------------------------------------------------------------------------------

    def _check_blueprints(self) -> None:
        """Every named blueprint must exist and build on at least one wrapped layer, before step 1."""
        problems = []
        kinds = {layer.spec.kind for layer in self.manager.layers.values()}
        for i, name in enumerate(self.loaded.recipe.seeds.blueprints):
            if name not in self.library.files:
                problems.append(self.loaded.locate(f"seeds.blueprints.{i}", f"unknown blueprint {name!r} "
                                                   f"(known: {', '.join(self.library.names())})"))
                continue
            if self.library.get(name).blueprint.host not in kinds:
                problems.append(self.loaded.locate(
                    f"seeds.blueprints.{i}", f"blueprint {name!r} grows on {self.library.get(name).blueprint.host} "
                    f"layers but the targets wrap only {', '.join(sorted(kinds))} layers"))
        if problems:
            raise ConfigError(problems)
        for layer_name, layer in self.manager.layers.items():
            for name in self._blueprints_for(layer.spec.kind):
                try:
                    self._kernel_spec(name, layer_name).resolve()
                except ResolveError as exc:
                    raise ConfigError(self.library.get(name).problem(exc)) from None

    def _blueprints_for(self, kind: str) -> list[str]:
        return [n for n in self.loaded.recipe.seeds.blueprints
                if n in self.library.files and self.library.get(n).blueprint.host == kind]

    def _kernel_spec(self, blueprint: str, layer: str) -> KernelSpec:
        dtype = str(next(self.manager.layers[layer].host.parameters()).dtype).removeprefix("torch.")
        return KernelSpec(self.library.get(blueprint).blueprint, self.manager.layers[layer].spec,
                          self.loaded.recipe.seeds.rank, dtype, self.device.type, self.input_shapes[layer])

    def _seed_cost(self, blueprint: str, layer: str) -> SeedCost:
        """Parameters and analytic forward FLOPs per sample of ``blueprint`` on ``layer`` (its real input shape)."""
        spec = self._kernel_spec(blueprint, layer)
        cost = analytic_cost(spec.resolve(), spec.sample_shape)
        return SeedCost(cost.params, cost.forward)

    def _seed_latency(self, blueprint: str, layer: str) -> float:
        """The kernel's characterised forward+backward latency (waits for its compile if needed)."""
        kernel = self._kernel(self._kernel_spec(blueprint, layer)).result()
        return float(kernel.manifest["characterisation"]["latency_ms"])

    # --- kernels -----------------------------------------------------------------------------------

    def _kernel(self, spec: KernelSpec) -> Future[Kernel]:
        """The kernel for ``spec``: from the store at once, else compiled by the background worker."""
        address = spec.address()
        future = self._kernel_futures.get(address)
        if future is None:
            stored = self.kernel_store.get(address)  # memory -> Redis -> SQL -> disk
            if stored is not None:
                future = Future()
                future.set_result(stored)
            else:
                if self._compiler is None:
                    self._compiler = CompileService(self.kernel_store, warm=False)
                self._compile_started[address] = time.perf_counter()
                future = self._compiler.request(spec)
                future.add_done_callback(lambda _: self._compile_done.setdefault(address, time.perf_counter()))
            self._kernel_futures[address] = future
        return future

    def _kernel_settled(self, address: str, ok: bool) -> None:
        """Report a background compile to telemetry once, from the training thread."""
        if address in self._compile_started and address in self._compile_done:
            seconds = self._compile_done.pop(address) - self._compile_started.pop(address)
            self.telemetry.compiled(self.step, seconds, ok)

    def _prepare_kernels(self) -> None:
        """Request every kernel the recipe can ask for. With ``run.deterministic`` wait for them
        before the first step, so the step at which a seed starts incubating never depends on
        compile speed; otherwise training starts at once and seeds wait (GERMINATED) for kernels."""
        started = time.perf_counter()
        futures = {(layer, bp): self._kernel(self._kernel_spec(bp, layer))
                   for layer, kasmina in self.manager.layers.items() for bp in self._blueprints_for(kasmina.spec.kind)}
        if not self.loaded.recipe.run.deterministic:
            return
        for (layer, blueprint), future in futures.items():
            error = future.exception()
            self._kernel_settled(self._kernel_spec(blueprint, layer).address(), error is None)
            if error is not None:
                self._kernel_failed(layer, blueprint, error)
        self.kernel_wait_s = time.perf_counter() - started
        self._record({"event": "kernels_ready", "step": self.step, "kernels": len({id(f) for f in futures.values()}),
                      "unusable": sorted(f"{layer}:{bp}" for layer, bp in self._unusable),
                      "seconds": round(self.kernel_wait_s, 3)})

    def _kernel_failed(self, layer: str, blueprint: str, error: BaseException) -> None:
        """A kernel that cannot be compiled: the policy moves on to other choices for that layer."""
        if (layer, blueprint) in self._unusable:
            return
        self._unusable.add((layer, blueprint))
        self.policy.forbid(layer, blueprint)
        problems = getattr(error, "problems", None) or [error]
        self._record({"event": "kernel_failed", "step": self.step, "layer": layer, "slot": None,
                      "blueprint": blueprint, "problems": [str(p) for p in problems]})

    def _activate_ready_seeds(self) -> None:
        """Start incubation for every germinated seed whose kernel has arrived; never waits."""
        for ref in self.manager.pending():
            slot = self.manager.layers[ref.layer].slots[ref.index]
            assert slot.blueprint is not None and slot.kernel is not None
            future = self._kernel_futures.get(slot.kernel) or self._kernel(self._kernel_spec(slot.blueprint, ref.layer))
            if not future.done():
                continue
            error = future.exception()
            self._kernel_settled(slot.kernel, error is None)
            if error is not None:
                self._kernel_failed(ref.layer, slot.blueprint, error)
                self._remove_seed(ref, rolled_back=False, reason="its kernel failed to compile")
                continue
            seed = future.result().instantiate(self.device, next(self.model.parameters()).dtype)
            self._record(self.manager.start_incubation(ref, seed))
            optim.add_group(self.optimizer, ref.key, self.manager.seed_parameters(ref),
                            self.loaded.recipe.trainer.lr * self.loaded.recipe.seeds.lr_scale)

    def build_seed(self, layer: str, blueprint: str) -> torch.nn.Module:
        """The module of a seed a checkpoint records (its weights are then overwritten). Resume
        needs it before the first step, so this waits for a compile if the store lacks the kernel."""
        future = self._kernel(self._kernel_spec(blueprint, layer))
        if not future.done() and self.step > 0 and self._compiler is not None:
            self.blocked_steps += 1  # a training step had to wait for a compile
        return future.result().instantiate(self.device, next(self.model.parameters()).dtype)

    # --- the loop ----------------------------------------------------------------------------------

    def fit(self, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
        recipe = self.loaded.recipe
        self.on_progress = on_progress
        self.started = time.perf_counter()
        self.telemetry = RunTelemetry(recipe.telemetry, self._record, self.manager.counts)
        metrics_url = self.telemetry.start()
        previous_handlers: dict[int, Any] = {}
        try:
            self._open_logs()
            self.run_id = uuid.uuid4().hex  # this segment of the run in the asset repository
            self._mirror(lambda repo: repo.start_run(self.run_id, self.run_dir.name, self.loaded.sha256))
            if self._resumed_from is None:
                self._record({"event": "run_start", "step": 0, "run_id": self.run_id, "recipe_sha256": self.loaded.sha256,
                              "device": str(self.device), "params": self.params_initial,
                              "layers": list(self.manager.layers), **self.telemetry.identity()})
            else:
                self._record({"event": "run_resume", "step": self.step, "run_id": self.run_id,
                              "checkpoint": self._resumed_from.path.name,
                              **self.telemetry.identity()})
            if metrics_url:
                self._report(float("nan"), f"metrics: {metrics_url}")
            self._prepare_kernels()
            if recipe.policy.selector.share_across_runs and self._resumed_from is None:
                pulls = self.policy.selector.warm_start(workspace_store(recipe.storage.workspace))
                self._record({"event": "selector_warm_start", "step": self.step, "pulls": pulls})
            previous_handlers = self._install_signal_handlers()
            self._last_checkpoint_time = time.monotonic()
            loss_value = float("nan")
            while self.step < recipe.trainer.max_steps:
                tick = time.perf_counter()
                loss = self._train_step()
                log = self.step % recipe.trainer.log_every == 0 or self.step == recipe.trainer.max_steps
                if log:
                    loss_value = float(loss)  # the only per-step sync, every log_every steps
                    if self._governed(loss_value):
                        continue
                    self._update_gate(loss_value)
                    self.policy.observe_train(self.step, loss_value)
                    row = {"step": self.step, "loss": loss_value, "lr": self.optimizer.param_groups[0]["lr"],
                           "params": count_parameters(self.model), **self.manager.counts()}
                    self.metrics.write(row)
                    self.telemetry.logged(row)
                    self.telemetry.cache_counts(self.kernel_store.stats()["tiers"])
                if self.step % recipe.trainer.eval_every == 0:
                    self._validate_and_grow()
                    self._report(loss_value if log else float("nan"))
                elif log:
                    self._report(loss_value)
                if self._checkpoint_due():
                    self.save_checkpoint()
                if self._stop_signal is not None:
                    self._stop()
                self.telemetry.step_done(self.step, time.perf_counter() - tick)
            return self._finish()
        finally:
            if self._compiler is not None:
                self._compiler.close(wait=False)
            self.kernel_store.close()
            self.telemetry.stop()
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            if hasattr(self, "events"):
                self.events.close()
                self.metrics.close()

    def _train_step(self) -> torch.Tensor:
        cfg = self.loaded.recipe
        self.model.train()
        x, y = self.sampler.next()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        measure = self.step % cfg.policy.merit_every == 0 and self.policy.in_window(self.step + cfg.policy.merit_every)
        with self.policy.measuring(self.manager.layers, measure):  # health hooks only on measurement steps
            loss = F.cross_entropy(self.model(x), y)
        self.governor.watch(loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if measure:
            with self.telemetry.morph:
                self.merit.observe(self.manager)
        if cfg.trainer.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.trainer.grad_clip)
        optim.apply_lr(self.optimizer, self.step, cfg.trainer)
        self.optimizer.step()
        self.step += 1
        with self.telemetry.morph:
            for event in self.manager.step(self._gate_open):
                self._record(event)
            self._activate_ready_seeds()
            for ref in self.manager.due_for_verdict():
                self._verdict(ref)
        return loss.detach()

    def _update_gate(self, loss_value: float) -> None:
        """The gated blend schedule advances only while the logged training loss is not rising."""
        previous = self._previous_logged_loss
        self._gate_open = previous is None or loss_value <= previous * 1.05
        self._previous_logged_loss = loss_value

    def _validate_and_grow(self) -> None:
        self.last_val = evaluate(self.model, self.val_batches, self.device)
        self.metrics.write({"step": self.step, "val_loss": self.last_val.loss, "val_accuracy": self.last_val.accuracy})
        self.telemetry.validated(self.last_val.loss, self.last_val.accuracy)
        self.policy.observe_validation(self.step, self.last_val.loss)
        if self.governor.config.enabled:
            self._snapshot = snapshot.capture(self)  # a known-good point to roll back to
        if not self.policy.in_window(self.step):
            return
        with self.telemetry.morph:
            self._execute(self.policy.decide(self.step, self.manager, self.merit.scores(), self._contribution))

    def _execute(self, decisions: Decisions) -> None:
        """Carry out the policy's decisions: culls first (they make room), then germinations."""
        for cull in decisions.culls:
            self._remove_seed(cull.slot, rolled_back=False, reason=cull.reason, **cull.evidence)
        for decision in decisions.germinations:
            self._germinate(decision)
        if decisions.skipped is not None:
            self._record({"event": "growth_skipped", "step": self.step, **decisions.skipped})

    def _contribution(self, ref: SlotRef) -> float:
        """Counterfactual validation-loss gain of a live seed (REPLACE ranks a layer's seeds by it)."""
        layer = self.manager.layers[ref.layer]
        return counterfactual(self.model, layer, ref.index, self.verdict_batches, self.device).loss_gain

    def _germinate(self, decision: GrowthDecision) -> None:
        spec = self._kernel_spec(decision.blueprint, decision.slot.layer)
        self._kernel(spec)
        self._record(self.manager.germinate(decision.slot, decision.blueprint, spec.address(), spec.resolve().params) |
                     {"reason": decision.reason, "merit": decision.merit, "kernel": spec.address(),
                      "inputs": decision.inputs})
        self._activate_ready_seeds()

    def _verdict(self, ref: SlotRef) -> None:
        """Counterfactual evaluation: keep the seed only if muting it costs more than the margin."""
        layer = self.manager.layers[ref.layer]
        result = counterfactual(self.model, layer, ref.index, self.verdict_batches, self.device)
        evidence = {"val_loss_with": result.with_seed.loss, "val_loss_without": result.without_seed.loss,
                    "val_acc_with": result.with_seed.accuracy, "val_acc_without": result.without_seed.accuracy,
                    "loss_gain": result.loss_gain, "margin": self.loaded.recipe.seeds.fossilize_margin}
        kept = result.loss_gain > self.loaded.recipe.seeds.fossilize_margin
        evidence |= self.policy.verdict(self.manager, ref, result.loss_gain, kept)  # the selector's reward
        if kept:
            self._record(self.manager.fossilize(ref, **evidence))
        else:
            self._remove_seed(ref, rolled_back=False, **evidence)

    def _remove_seed(self, ref: SlotRef, rolled_back: bool, **evidence: Any) -> None:
        had_module = str(ref.index) in self.manager.layers[ref.layer].seeds  # a GERMINATED seed has none yet
        event, _ = self.manager.cull(ref, rolled_back=rolled_back, **evidence)
        if had_module:
            optim.remove_group(self.optimizer, ref.key)
        self._record(event)

    # --- governor ----------------------------------------------------------------------------------

    def _governed(self, loss_value: float) -> bool:
        """Roll back if the governor objects; returns whether it did."""
        reason = self.governor.judge(loss_value)
        if reason is None:
            return False
        self._record({"event": "anomaly", "step": self.step, "kind": "loss", "reason": reason})
        if self._snapshot is None:
            raise EsperError(f"governor: {reason} at step {self.step}, and there is no good state to roll back to")
        self.governor.rolled_back()
        position = self.sampler.position()  # keep moving through the data: skip the batches that went bad
        suspect = self._last_changed
        from_step = self.step
        snapshot.restore(self, *self._snapshot)
        self.sampler.seek(**position)
        evidence: dict[str, Any] = {"reason": reason, "from_step": from_step}
        if suspect is not None:
            blueprint = self.manager.layers[suspect.layer].slots[suspect.index].blueprint
            self.policy.penalise(suspect.layer, blueprint)
            if str(suspect.index) in self.manager.layers[suspect.layer].seeds and self.manager.state(suspect).live:
                self._remove_seed(suspect, rolled_back=True, **evidence)
                return True
        self._record({"event": "rollback", "step": self.step, **evidence})
        return True

    # --- checkpoints -------------------------------------------------------------------------------

    def _checkpoint_due(self) -> bool:
        cfg = self.loaded.recipe.checkpoint
        if cfg.every_steps and self.step % cfg.every_steps == 0:
            return True
        return bool(cfg.every_minutes) and time.monotonic() - self._last_checkpoint_time >= cfg.every_minutes * 60

    def save_checkpoint(self) -> Path:
        """Commit a checkpoint of the current state and apply retention."""
        assert self.run_dir is not None
        name = store.checkpoint_name(self.step)
        started = time.perf_counter()
        self._record({"event": "checkpoint", "step": self.step, "name": name})
        tensors, state = snapshot.capture(self)
        state["governor"] = self.governor.state_dict()
        state["recipe_dir"] = str(self.base_dir)
        val = self.last_val
        info = {"recipe_sha256": self.loaded.sha256, "device": str(self.device), "epoch": self.sampler.epoch,
                "esper": _version(), "val_loss": val.loss if val else None}
        directory = self.run_dir / "checkpoints"
        path = store.save(directory, self.step, tensors, state, info)
        store.retain(directory, self.loaded.recipe.checkpoint.keep, lambda m: m.get("val_loss"))
        self._last_checkpoint_time = time.monotonic()
        self.telemetry.checkpointed(time.perf_counter() - started)
        return path

    def log_cursor(self) -> dict[str, Any]:
        """Where the run's logs end now: a resume truncates them here so nothing is written twice."""
        return {"events_bytes": self.events.path.stat().st_size, "events_seq": self.events.seq,
                "events_prev": self.events.prev, "metrics_bytes": self.metrics.path.stat().st_size}

    def _open_logs(self) -> None:
        if self._resumed_from is None:
            recipe = self.loaded.recipe
            self.run_dir = _fresh_run_dir(Path(recipe.run.output_dir).resolve() / recipe.run.name)
            (self.run_dir / "recipe.yaml").write_text(self.loaded.resolved_yaml, encoding="utf-8")
            (self.run_dir / "recipe.sha256").write_text(self.loaded.sha256 + "\n", encoding="utf-8")
        else:
            assert self.run_dir is not None
            cursor = self._resumed_from.state["logs"]
            for filename, size in (("events.jsonl", cursor["events_bytes"]), ("metrics.jsonl", cursor["metrics_bytes"])):
                with (self.run_dir / filename).open("r+b") as handle:
                    handle.truncate(size)
            store.remove_leftovers(self.run_dir / "checkpoints")
        self.events = EventLog(self.run_dir / "events.jsonl")
        self.metrics = JsonlWriter(self.run_dir / "metrics.jsonl")
        if self._resumed_from is not None:
            cursor = self._resumed_from.state["logs"]
            self.events.seq, self.events.prev = cursor["events_seq"], cursor["events_prev"]

    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGINT/SIGTERM finish the current step, write a checkpoint, and stop (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        def request_stop(signum: int, frame: object) -> None:
            self._stop_signal = signum
        return {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}

    def _stop(self) -> None:
        path = self.save_checkpoint()
        name = signal.Signals(self._stop_signal).name if self._stop_signal else "signal"
        self._record({"event": "interrupted", "step": self.step, "signal": name, "checkpoint": path.name})
        self._mirror(lambda repo: repo.finish_run(self.run_id, "interrupted"))
        stop = Interrupted(f"{name} received: stopped at step {self.step}; checkpoint {path} written. "
                           f"Continue with: esper resume --checkpoint {self.run_dir}")
        stop.exit_code = 128 + int(self._stop_signal or signal.SIGINT)
        raise stop

    # --- output ------------------------------------------------------------------------------------

    def _mirror(self, action: Callable[[Any], object]) -> None:
        """Write to the asset repository through the SQL tier's deadline and circuit breaker. A
        repository that is down, slow or refusing never fails the run: events.jsonl stays complete."""
        sql = self.kernel_store.tier("sql")
        if sql is None:
            return
        try:
            sql.guard.call(action, sql.repository)
        except Exception as exc:  # TierUnavailable or a refusal: said once, the run goes on
            if not self._mirror_failed:
                self._mirror_failed = True
                print(f"warning: asset repository not updated ({type(exc).__name__}: {exc}); "
                      f"the run directory keeps the full record", file=sys.stderr)

    def _record(self, event: Event) -> None:
        if event["event"] in ("germinate", "blend", "probation", "fossilize"):
            self._last_changed = SlotRef(event["layer"], event["slot"])
        self.events.append(event)
        line = self.events.last_line
        self._mirror(lambda repo: repo.append_event(self.run_id, line))
        self.telemetry.on_event(event)
        if "layer" in event:
            self._report(float("nan"), describe(event))

    def _report(self, loss: float, last_event: str | None = None) -> None:
        if self.on_progress is None:
            return
        val = self.last_val
        self.on_progress(Progress(self.step, self.loaded.recipe.trainer.max_steps, loss,
                                  val.loss if val else None, val.accuracy if val else None,
                                  count_parameters(self.model), self.manager.counts(),
                                  time.perf_counter() - self.started, last_event))

    def _finish(self) -> dict[str, Any]:
        assert self.run_dir is not None
        if self.loaded.recipe.policy.selector.share_across_runs:
            self.policy.selector.share(workspace_store(self.loaded.recipe.storage.workspace))
        val = evaluate(self.model, self.val_batches, self.device)
        test = evaluate(self.model, list(ordered_batches(self.data.test, self.loaded.recipe.data.eval_batch_size)),
                        self.device)
        final = self.run_dir / "final"
        final.mkdir(exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                  str(final / "model.safetensors"))
        (final / "topology.json").write_text(json.dumps(self.manager.topology(), indent=2), encoding="utf-8")
        summary = {
            "run_dir": str(self.run_dir), "recipe_sha256": self.loaded.sha256, "device": str(self.device),
            "steps": self.step, "wall_time_s": round(time.perf_counter() - self.started, 3),
            "val_loss": val.loss, "val_accuracy": val.accuracy, "test_loss": test.loss, "test_accuracy": test.accuracy,
            "params_initial": self.params_initial, "params_final": count_parameters(self.model),
            "seeds": self.manager.counts(),
            "fossilized": [{"layer": n, "slot": i, "blueprint": s.blueprint, "params": s.params}
                           for n, layer in self.manager.layers.items() for i, s in enumerate(layer.slots)
                           if s.state.name == "FOSSILIZED"],
            "rollbacks": self.governor.rollbacks,
            "kernel_wait_s": round(self.kernel_wait_s, 3), "blocked_steps": self.blocked_steps,
        }
        self._record({"event": "run_end", "step": self.step, "val_accuracy": val.accuracy,
                      "test_accuracy": test.accuracy, "params": summary["params_final"]})
        summary["events_head"] = self.events.prev
        self._mirror(lambda repo: repo.finish_run(self.run_id, "finished"))
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        return summary


class Interrupted(EsperError):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; exits 128 + the signal number."""


def _version() -> str:
    from esper_core import __version__
    return __version__


def _fresh_run_dir(base: Path) -> Path:
    """``runs/NAME``, or ``runs/NAME-2``, ``-3``... so an earlier run's results are never overwritten."""
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    candidate.mkdir(parents=True)
    return candidate
