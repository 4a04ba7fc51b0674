"""Tolaria, the training loop: recipe -> data, model, seeds -> steps, growth, verdicts -> run directory.

Data flows one way. The trainer asks the policy what to grow, builds the kernel, tells the
SeedManager to execute, updates the optimizer through :mod:`.optim`, and records everything in the
run directory. Per-step work outside the forward/backward is kept free of host-device syncs: the
loss is read only every ``log_every`` steps and gradient merit only every ``merit_every`` steps.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from esper_core.blueprints.builder import ResolveError
from esper_core.blueprints.library import BlueprintLibrary
from esper_core.compiler.kernels import KernelSpec, build_kernel
from esper_core.errors import RECIPE_FIELD, ConfigError, EsperError
from esper_core.policy.growth import GrowthDecision, GrowthPolicy
from esper_core.policy.merit import GradientMerit
from esper_core.recipe.load import LoadedRecipe, load_recipe, resolve_relative
from esper_core.seeds.manager import Event, SeedManager, SlotRef, wrap
from esper_core.telemetry.jsonl import EventLog, JsonlWriter
from esper_core.training import optim
from esper_core.training.batches import EpochSampler, ordered_batches
from esper_core.training.data import build_data
from esper_core.training.evaluate import Scores, counterfactual, evaluate
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


def seed_everything(seed: int, deterministic: bool) -> None:
    # cuBLAS needs this set before its first use to give deterministic results.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def describe(event: Event) -> str:
    text = f"step {event['step']}: {event['event']} {event.get('blueprint') or ''} in {event['layer']}#{event['slot']}"
    return " ".join(text.split())


@dataclass
class Trainer:
    """One run of one recipe. Build with :meth:`from_recipe`; :meth:`fit` trains and returns the summary."""

    loaded: LoadedRecipe
    device: torch.device = field(init=False)

    @classmethod
    def from_recipe(cls, path: str | Path, overrides: Sequence[str] = ()) -> "Trainer":
        return cls(load_recipe(path, overrides))

    def __post_init__(self) -> None:
        recipe = self.loaded.recipe
        self.device = select_device(recipe.run.device)
        seed_everything(recipe.run.seed, recipe.run.deterministic)
        try:
            self.data = build_data(recipe.data, recipe.run.seed, self.loaded.path.parent)
            self.model = build_model(recipe.model, self.data.input_shape, self.data.num_classes)
            self.manager: SeedManager = wrap(self.model, config=recipe.seeds)
        except ConfigError as exc:
            raise ConfigError([self.loaded.locate(p.field, p.message) if p.source == RECIPE_FIELD and p.field else p
                               for p in exc.problems]) from None
        self.params_initial = count_parameters(self.model)
        self.model.to(self.device)
        self.library = BlueprintLibrary.discover(resolve_relative(self.loaded, d) for d in recipe.seeds.blueprint_dirs)
        self._check_blueprints()
        self.optimizer = optim.build_optimizer(self.model, recipe.trainer)
        self.merit = GradientMerit(recipe.policy.merit_decay)
        self.policy = GrowthPolicy(recipe.policy, recipe.trainer.max_steps, self._blueprints_for, self._params_of)
        self.sampler = EpochSampler(self.data.train, recipe.data.batch_size, recipe.run.seed)
        self.val_batches = list(ordered_batches(self.data.val, recipe.data.eval_batch_size))
        self.verdict_batches = list(ordered_batches(self.data.val, recipe.data.eval_batch_size,
                                                    limit=recipe.seeds.eval_batches))
        self.step = 0
        self.last_val: Scores | None = None
        self._gate_open = True
        self._previous_logged_loss: float | None = None

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
                          self.loaded.recipe.seeds.rank, dtype)

    def _params_of(self, blueprint: str, layer: str) -> int:
        return self._kernel_spec(blueprint, layer).resolve().params

    # --- the loop ----------------------------------------------------------------------------------

    def fit(self, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
        recipe = self.loaded.recipe
        self.run_dir = _fresh_run_dir(Path(recipe.run.output_dir) / recipe.run.name)
        (self.run_dir / "recipe.yaml").write_text(self.loaded.resolved_yaml, encoding="utf-8")
        (self.run_dir / "recipe.sha256").write_text(self.loaded.sha256 + "\n", encoding="utf-8")
        self.events = EventLog(self.run_dir / "events.jsonl")
        self.metrics = JsonlWriter(self.run_dir / "metrics.jsonl")
        self.on_progress = on_progress
        self.started = time.perf_counter()
        self._record({"event": "run_start", "step": 0, "recipe_sha256": self.loaded.sha256,
                      "device": str(self.device), "params": self.params_initial,
                      "layers": list(self.manager.layers)})
        try:
            loss_value = float("nan")
            while self.step < recipe.trainer.max_steps:
                loss = self._train_step()
                log = self.step % recipe.trainer.log_every == 0 or self.step == recipe.trainer.max_steps
                if log:
                    loss_value = float(loss)  # the only per-step sync, every log_every steps
                    self._update_gate(loss_value)
                    self.metrics.write({"step": self.step, "loss": loss_value, "lr": self.optimizer.param_groups[0]["lr"],
                                        "params": count_parameters(self.model), **self.manager.counts()})
                if self.step % recipe.trainer.eval_every == 0:
                    self._validate_and_grow()
                    self._report(loss_value)
                elif log:
                    self._report(loss_value)
            return self._finish()
        finally:
            self.events.close()
            self.metrics.close()

    def _train_step(self) -> torch.Tensor:
        cfg = self.loaded.recipe
        self.model.train()
        x, y = self.sampler.next()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.step % cfg.policy.merit_every == 0 and self.policy.in_window(self.step + cfg.policy.merit_every):
            self.merit.observe(self.manager)
        if cfg.trainer.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.trainer.grad_clip)
        optim.apply_lr(self.optimizer, self.step, cfg.trainer)
        self.optimizer.step()
        self.step += 1
        for event in self.manager.step(self._gate_open):
            self._record(event)
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
        self.policy.observe_validation(self.last_val.loss)
        if not self.policy.in_window(self.step):
            return
        decision = self.policy.decide(self.step, self.manager, self.merit.scores())
        if decision is not None:
            self._germinate(decision)

    def _germinate(self, decision: GrowthDecision) -> None:
        seed, address = build_kernel(self._kernel_spec(decision.blueprint, decision.slot.layer))
        self._record(self.manager.germinate(decision.slot, seed, decision.blueprint, address) |
                     {"reason": decision.reason, "merit": decision.merit, "kernel": address})
        optim.add_group(self.optimizer, decision.slot.key, self.manager.seed_parameters(decision.slot),
                        self.loaded.recipe.trainer.lr * self.loaded.recipe.seeds.lr_scale)
        self._record(self.manager.start_incubation(decision.slot))

    def _verdict(self, ref: SlotRef) -> None:
        """Counterfactual evaluation: keep the seed only if muting it costs more than the margin."""
        layer = self.manager.layers[ref.layer]
        result = counterfactual(self.model, layer, ref.index, self.verdict_batches, self.device)
        evidence = {"val_loss_with": result.with_seed.loss, "val_loss_without": result.without_seed.loss,
                    "val_acc_with": result.with_seed.accuracy, "val_acc_without": result.without_seed.accuracy,
                    "loss_gain": result.loss_gain, "margin": self.loaded.recipe.seeds.fossilize_margin}
        if result.loss_gain > self.loaded.recipe.seeds.fossilize_margin:
            self._record(self.manager.fossilize(ref, **evidence))
        else:
            event, _ = self.manager.cull(ref, **evidence)
            optim.remove_group(self.optimizer, ref.key)
            self._record(event)

    # --- output ------------------------------------------------------------------------------------

    def _record(self, event: Event) -> None:
        self.events.append(event)
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
        val = evaluate(self.model, self.val_batches, self.device)
        test = evaluate(self.model, list(ordered_batches(self.data.test, self.loaded.recipe.data.eval_batch_size)),
                        self.device)
        final = self.run_dir / "final"
        final.mkdir()
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
        }
        self._record({"event": "run_end", "step": self.step, "val_accuracy": val.accuracy,
                      "test_accuracy": test.accuracy, "params": summary["params_final"]})
        summary["events_head"] = self.events.prev
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        return summary


def _fresh_run_dir(base: Path) -> Path:
    """``runs/NAME``, or ``runs/NAME-2``, ``-3``... so an earlier run's results are never overwritten."""
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    candidate.mkdir(parents=True)
    return candidate
