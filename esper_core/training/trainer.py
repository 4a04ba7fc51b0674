"""Tolaria, ``esper train``: a training loop around the growth controller, driven by a recipe.

The trainer owns what a user's own loop would: the data, the model, the optimizer and its schedule,
the loss, validation, the run directory, checkpoints and signals. Everything about growth (when and
where to grow, kernels, seeds, optimizer groups of seeds, verdicts, the governor) is the
:class:`~esper_core.growth.controller.GrowthController`, called at the same three points a user's
loop calls it. Per-step work outside forward/backward is free of host-device syncs: the loss is read
only every ``log_every`` steps (by the controller, which hands the value back).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from esper_core import distributed
from esper_core.checkpoints import store
from esper_core.checkpoints.lock import RunLock
from esper_core.errors import RECIPE_FIELD, CheckpointError, ConfigError, Problem
from esper_core.growth.controller import GrowthController, StepOutcome
from esper_core.growth.evaluation import Evaluation
from esper_core.growth.state import cpu_copy, join
from esper_core.policy.arm_store import workspace_store
from esper_core.recipe.checks import check_device
from esper_core.recipe.load import LoadedRecipe, load_recipe
from esper_core.recipe.overrides import COMMAND_LINE
from esper_core.seeds.kasmina import compile_whole_graph
from esper_core.storage import open_kernel_store
from esper_core.telemetry.binding import check_resume_key
from esper_core.training import optim, run_files, run_state
from esper_core.training.accumulation import average_gradients, micro_batches
from esper_core.training.best import BestModel
from esper_core.training.checkpoint_state import check_run_state, check_world_size, refusing
from esper_core.training.compiled import WholeGraph, compile_model
from esper_core.training.data import build_data, import_factory
from esper_core.training.early_stop import EarlyStopping, growth_ends
from esper_core.training.factory_sources import changed_sources, module_sources
from esper_core.training.finish import finish_run
from esper_core.training.interrupts import StopSignals, stop
from esper_core.training.loaders import EvalBatches, TrainBatches, first_batch, resident
from esper_core.training.precision import Precision, kernel_dtype
from esper_core.training.models import build_model, count_parameters
from esper_core.training.recording import RunRecorder, progress_event
from esper_core.training.saved_recipe import RecipeRecord, load_saved_recipe
from esper_core.training.setup import seed_everything, select_device
from esper_core.training.size import ParameterCount
from esper_core.training.tasks import Task

RESUMABLE_OVERRIDES = ("trainer.max_steps", "checkpoint.", "telemetry.", "distributed.")
"""Keys an override may change at resume; anything else would make the continuation a different run
(``distributed.timeout_s`` changes only how long the ranks wait for each other, e.g. after a stall)."""


@dataclass
class Trainer:
    """One run of one recipe. Build with :meth:`from_recipe` or :meth:`resume`; :meth:`fit` trains
    and returns the summary."""

    loaded: LoadedRecipe
    device: torch.device = field(init=False)

    @classmethod
    def from_recipe(cls, path: str | Path, overrides: Sequence[str] = (),
                    allow_factories: bool | None = None) -> "Trainer":
        """``allow_factories=False`` refuses a recipe naming user code (default: ``ESPER_ALLOW_FACTORIES``)."""
        return cls(load_recipe(path, overrides, allow_factories))

    @classmethod
    def resume(cls, target: str | Path, overrides: Sequence[str] = (), strict: bool = False,
               warn: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
               allow_factories: bool | None = None) -> "Trainer":
        """Rebuild a run from its newest verified checkpoint (or the one named; ``s3://`` URLs are
        downloaded first) and continue it."""
        bad = [o for o in overrides if not o.split("=", 1)[0].startswith(RESUMABLE_OVERRIDES)]
        if bad:
            raise ConfigError([Problem(COMMAND_LINE, f"override {o!r} cannot change at resume (allowed: "
                                       f"trainer.max_steps, checkpoint.*, telemetry.*, distributed.*)") for o in bad])
        if str(target).startswith("s3://"):  # downloaded into the local cache and verified, then as below
            from esper_core.artifacts.fetch import fetch_run
            target = fetch_run(str(target), "checkpoint")
        checkpoint = store.find(Path(target), strict, warn)
        run_dir = checkpoint.path.parent.parent
        run_files.check_run_files(run_dir)
        check_resume_key(run_dir)
        where = str(checkpoint.path / store.STATE)
        record = {**checkpoint.state, "recipe_sha256": checkpoint.manifest.get("recipe_sha256")}
        loaded, recipe_record = load_saved_recipe(run_dir, record, str(checkpoint.path), overrides, allow_factories)
        check_world_size(checkpoint.manifest, str(checkpoint.path / store.MANIFEST))
        check_run_state(checkpoint.state.get("run"), run_dir, where)
        step = checkpoint.state["run"]["controller"]["topology"]["step"]
        if loaded.recipe.trainer.max_steps < step:
            raise ConfigError(Problem(COMMAND_LINE, f"{loaded.recipe.trainer.max_steps} is below the checkpoint's step "
                                      f"{step}; a resume continues a run and cannot shorten it (a larger value "
                                      "extends it)", field="trainer.max_steps"))
        trainer = cls(loaded)
        try:
            return trainer._continue_from(checkpoint, recipe_record, overrides)
        except BaseException:
            trainer._release()
            raise

    def _continue_from(self, checkpoint: store.Checkpoint, recipe_record: RecipeRecord,
                       overrides: Sequence[str]) -> "Trainer":
        """The rest of :meth:`resume` once this trainer is built: check the code and the data, restore the
        state. The code first: a factory edited to other shapes would otherwise fail the restore below as a
        bare size mismatch, and one that kept them would continue the run with other code, unseen."""
        changed = changed_sources(self.loaded, recipe_record.code, self.recipe_record.code,
                                  "resuming with other code would not continue the same run; restore the "
                                  "module, or start a new run with it")
        if changed:
            raise CheckpointError(changed)
        recorded = checkpoint.manifest.get("data_sha256")
        if recorded is not None and recorded != self.data.fingerprint:
            data = self.loaded.recipe.data
            raise ConfigError(Problem(str(self.base_dir / str(data.path)), f"changed since {checkpoint.path.name} "
                                      f"was written (sha256 {str(recorded)[:12]}… then, "
                                      f"{str(self.data.fingerprint)[:12]}… now): resuming on other data would not "
                                      "continue the same run; restore the file, or train a new run on it",
                                      field="data.path"))
        # the code imported now: the recorded code (checked above), or, in a run recorded before code was, from now on
        self.recipe_record = replace(recipe_record, code=self.recipe_record.code)
        with refusing(str(checkpoint.path / store.STATE)):
            state = join(checkpoint.tensors, checkpoint.state["run"])
            self.controller.check_snapshot(state["controller"])
            run_state.restore(self, state)
        self.run_dir = checkpoint.path.parent.parent
        self._resumed_from = checkpoint
        self._resume_overrides = list(overrides)
        return self

    def wall_time_s(self) -> float:
        """Seconds this run has trained: this segment's, plus those of the earlier segments up to the
        checkpoint it resumed from."""
        return self.earlier_wall_time_s + time.perf_counter() - self.started

    @property
    def base_dir(self) -> Path:
        """The directory relative recipe paths resolve against (:attr:`LoadedRecipe.base_dir`)."""
        return self.loaded.base_dir

    def __post_init__(self) -> None:
        try:
            self._build()
        except BaseException as error:
            lost = self._lost(error)  # before the process group closes: the roll call of a timeout needs it
            self._release()
            if lost is not None:
                raise lost from None
            raise

    def _release(self) -> None:
        """Close what a construction that failed part-way (or a resume refused after it) had opened,
        newest first: the process group, the kernel store's database connection and threads, the
        recorder's, the compile workers. Left open, they outlived the failure, and a later run in the
        same process (a library user retrying) crashed in SQLite. A part that fails to close is one
        warning line, so the error that stopped construction is the one that propagates."""
        opened = vars(self)
        for name in ("replica", "whole_graph", "controller", "recorder", "kernel_store", "world"):
            part = opened.get(name)
            if part is None:
                continue
            try:
                part.close()
            except Exception as exc:  # the construction's own error is the one to report
                print(f"warning: {name} did not close after a failed start ({type(exc).__name__})", file=sys.stderr)

    def _build(self) -> None:
        recipe = self.loaded.recipe
        check_device(self.loaded, torch.cuda.is_available())
        self.world = distributed.join(select_device(recipe.run.device),
                                      timedelta(seconds=recipe.distributed.timeout_s))
        self.device = self.world.device if self.world is not None else select_device(recipe.run.device)
        self.leader = self.world is None or self.world.leader  # the one process that writes the run
        if self.world is not None and recipe.checkpoint.keep_best:
            # final/ would be evaluated on rank 0 alone, but every evaluation under torchrun is collective
            with self.loaded.located():
                raise ConfigError(Problem(RECIPE_FIELD, "checkpoint.keep_best is not supported under torchrun "
                                          "(several ranks) yet; train without it or in one process",
                                          field="checkpoint.keep_best"))
        seed_everything(recipe.run.seed, recipe.run.deterministic, self.device)
        with self.loaded.located(), self.loaded.importable():
            function = import_factory(recipe.task.function, "task.function") if recipe.task.function else None
            self.task = Task(recipe.task, function)
            self.stopping = EarlyStopping(recipe.trainer.early_stopping, self.task.kind, self.task.metric,
                                          growth_ends(recipe.policy, recipe.trainer.max_steps))
            self.data = build_data(recipe.data, recipe.run.seed, self.base_dir, recipe.task.kind,
                                   recipe.task.target_key)
            if self.world is not None:
                self._check_same_data(self.world)
            self.model = build_model(recipe.model, self.data.input_shape, self.data.num_classes)
            self.params_initial = count_parameters(self.model)
            self.model.to(self.device)
            self.task.check_fit(self.model, first_batch(self.data.train, 2))  # on the device it trains on
            # what rebuilds this run's recipe and the code it imported (esper_core.training.saved_recipe);
            # a resume checks the code against what the run recorded, then replaces it
            self.recipe_record = RecipeRecord.fresh(self.loaded, module_sources(self.loaded))
            self.kernel_store = open_kernel_store(recipe.storage)
            self.optimizer = optim.build_optimizer(self.model, recipe.trainer)
            world = self.world
            self.recorder = RunRecorder(recipe.telemetry, self.kernel_store, lambda: self.controller.step,
                                        lambda: self.controller.manager.counts(), writes=self.leader,
                                        rank=world.rank if world else None, local_rank=world.local_rank if world else 0)
            self.precision = Precision(recipe.trainer.precision, self.device)
            self.controller = GrowthController(
                self.model, self.optimizer, example=self.data.example(2), max_steps=recipe.trainer.max_steps,
                seeds=recipe.seeds, policy=recipe.policy, governor=recipe.trainer.governor, store=self.kernel_store,
                seed=recipe.run.seed, evaluate=self._verdict_evaluation, recorder=self.recorder,
                check_every=recipe.trainer.log_every,
                seed_lr=lambda step: optim.seed_lr(step, recipe.trainer, recipe.seeds, recipe.policy.growth_window[1]),
                blueprint_dirs=[self.base_dir / d for d in recipe.seeds.blueprint_dirs],
                deterministic=recipe.run.deterministic, start=False,
                kernel_dtype=kernel_dtype(recipe.trainer.precision), world=world, scaler=self.precision.scaler)
        self.controller.run_state = (lambda: cpu_copy(run_state.capture(self, checkpoint=False)),
                                     lambda state: run_state.restore(self, state))
        self.manager = self.controller.manager
        self.parameter_count = ParameterCount(self.model, self.manager)  # logged and reported: counted when seeds change
        compiled = recipe.trainer.compile != "none"  # training steps only: evaluation stays eager
        # One device: steps whose topology is settled and compiled run the model compiled as one
        # graph (WholeGraph), the others run it eagerly. Not the seed-path variant (a graph break at
        # each wrapped layer) for those: in a model that loops over its blocks, a break inside the
        # loop makes dynamo skip the model's whole frame, for every wrapper of it, so the first step
        # with a live seed or a measurement also cost every later idle step its compiled graph (a
        # CPU CNN: 14 -> 28 ms a step), and the broken-up steps ran slower than eager ones (H200
        # CNN: 64 against 83 steps/s).
        self.whole_graph = WholeGraph(
            self.model, recipe.trainer.compile, list(self.manager.layers.values()), self._training_pass,
            background=recipe.trainer.compile == "default" and not recipe.run.deterministic
            and self.device.type == "cuda",
            lasting=self.controller.topology_lasts, on_compiled=self.recorder.notify) \
            if compiled and self.world is None else None
        # Under torchrun every step runs through DDP over the seed-path variant (one wrapper, so the
        # skip above cannot cost another one its graph), rebuilt when seeds change the parameters.
        self.replica = None if self.world is None else distributed.Replica(
            self.model, compile_model(self.model, recipe.trainer.compile, len(self.manager.layers)) if compiled
            else self.model, self.world, self.manager.topology)
        data = recipe.data
        self.best = BestModel(recipe.checkpoint.keep_best)
        rank, size = (self.world.rank, self.world.size) if self.world is not None else (0, 1)
        with self.loaded.located():
            self.sampler = TrainBatches(resident(self.data.train, self.device),  # one optimizer step's samples
                                        data.batch_size * recipe.trainer.accumulate_steps, recipe.run.seed,
                                        data.num_workers, data.pin_memory, data.persistent_workers, rank, size)
            val = self.shard(resident(self.data.val, self.device), "validation")
        self.val_batches = self.eval_batches(val)
        self.verdict_batches = self.eval_batches(val, limit=recipe.seeds.eval_batches)
        self.last_val: dict[str, float] | None = None
        self.stopped_early: dict[str, Any] | None = None
        self.started = time.perf_counter()
        self.earlier_wall_time_s = 0.0  # training time of the segments before the checkpoint resumed from
        self.run_dir: Path | None = None
        self._resumed_from: store.Checkpoint | None = None
        self._resume_overrides: list[str] = []
        self.signals = StopSignals()
        self.checkpoints = run_files.CheckpointSchedule(recipe.checkpoint)

    def _check_same_data(self, world: distributed.World) -> None:
        """Refuse (exit 2, on every rank, the same line) data that differs between the ranks: each rank
        builds its own, and nothing later would notice (see :func:`esper_core.distributed.data.digest`)."""
        ranks = world.differing(distributed.digest({"train": self.data.train, "validation": self.data.val,
                                                    "test": self.data.test}))
        if not ranks:
            return
        data = self.loaded.recipe.data
        if data.source == "factory":
            field, why = "data.factory", ("a factory must return the same samples on every rank, so seed any "
                                          "randomness it uses from its arguments, never from the time, the process "
                                          "or RANK")
        elif data.path is not None:
            field, why = "data.path", "every node must read the same contents at this path"
        else:  # Esper's own sources are a function of the run seed: only different software could differ
            field, why = "data.source", "run the same versions of Esper, NumPy and PyTorch on every node"
        raise ConfigError(Problem(RECIPE_FIELD, f"the data differs between ranks ({distributed.describe_ranks(ranks)} "
                                  f"from rank 0): {why}", field=field))

    @property
    def step(self) -> int:
        return self.controller.step

    def shard(self, dataset: Dataset, what: str) -> Dataset:
        """This rank's block of a held-out split (the whole split in a single process)."""
        return dataset if self.world is None else distributed.shard(dataset, self.world.rank, self.world.size, what)

    def eval_batches(self, dataset: Dataset, limit: int | None = None) -> EvalBatches:
        """Evaluation batches of ``dataset`` (pass it through :func:`resident` first on a GPU)."""
        data = self.loaded.recipe.data
        return EvalBatches(dataset, data.eval_batch_size, limit, data.num_workers, data.pin_memory)

    # --- the loop ----------------------------------------------------------------------------------

    def fit(self, on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Train to ``trainer.max_steps``; ``on_event`` receives every event and progress report."""
        recipe = self.loaded.recipe
        if on_event is not None:
            self.recorder.listeners.append(on_event)
        self.started = time.perf_counter()
        telemetry = self.recorder.telemetry
        lock: RunLock | None = None
        try:
            with self.loaded.located():  # a port in use is refused before a run directory is made
                metrics_url = telemetry.start()
            if metrics_url and self.world is not None:
                # port 0 picks a free port on each rank: only the ranks know which, so rank 0 shows them all
                telemetry.rank_urls = self.world.gather_text(metrics_url)
            lock = run_files.claim_run_dir(self)
            run_files.open_run(self, self._resumed_from, self._resume_overrides)
            if metrics_url:
                self.recorder.notify({"event": "metrics_endpoint", "url": metrics_url,
                                      **({"ranks": telemetry.rank_urls} if telemetry.rank_urls else {})})
            self.controller.start()
            if recipe.policy.selector.share_across_runs and self._resumed_from is None:
                pulls = self.controller.policy.selector.warm_start(workspace_store(recipe.storage.workspace))
                self.recorder.record({"event": "selector_warm_start", "step": self.step, "pulls": pulls})
            self.signals.install()
            compile_whole_graph(self.whole_graph is not None)  # for the run: compiles may run on another thread
            self.model.train()  # once: evaluation passes restore the mode they found
            self.checkpoints.restart()
            while self.step < recipe.trainer.max_steps:
                tick = time.perf_counter()
                outcome = self._train_step()
                if outcome.rolled_back:
                    continue
                if outcome.loss is not None:
                    self.recorder.logged({"step": self.step, "loss": outcome.loss,
                                          "lr": self.optimizer.param_groups[0]["lr"],
                                          "params": self.parameter_count(), **self.manager.counts()})
                if self.step % recipe.trainer.eval_every == 0:
                    if self._validate_and_grow():
                        continue
                    self._report(outcome)
                    if self.stopped_early is not None:
                        break
                elif outcome.loss is not None:
                    self._report(outcome)
                if self.leader and self.checkpoints.due(self.step):
                    self.save_checkpoint()
                if self.signals.requested(self.world, self.step, recipe.trainer.log_every):
                    stop(self)
                telemetry.step_done(self.step, time.perf_counter() - tick)
            summary = finish_run(self)
            if self.world is not None:
                self.world.barrier()  # on every rank, fit returns once rank 0 has written the run's results
            return summary
        except RuntimeError as error:
            lost = self._lost(error)
            if lost is None:
                raise
            raise lost from None
        finally:
            if self.whole_graph is not None:
                self.whole_graph.close()
            compile_whole_graph(False)
            if self.replica is not None:
                self.replica.close()
            self.controller.close()
            self.kernel_store.close()
            self.signals.restore()
            self.recorder.close()
            if lock is not None:
                lock.release()
            if self.world is not None:
                self.world.close()

    def _lost(self, error: BaseException) -> distributed.PeerLost | None:
        """The one line a rank ends with when a collective failed because of another rank (``None`` for
        any other error): gloo's or NCCL's own error is a traceback from deep inside DDP or a collective,
        naming neither rank nor remedy. Either the other rank is gone (its process ended, the connection
        broke: :class:`PeerLost`, a consequence) or it never came within ``distributed.timeout_s``
        (:class:`RankStalled`, the cause: the ranks that waited name it)."""
        world = vars(self).get("world")  # a construction may fail before (or while) joining
        if world is None:
            return None
        stalled = distributed.timed_out(error)
        reason = None if stalled else distributed.peer_lost(error)
        if not stalled and reason is None:
            return None
        run, size = vars(self).get("run_dir"), world.size
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or size)  # torchrun's ranks on this node
        if run is not None and (run / "checkpoints" / store.LATEST).is_file():
            then = (f"continue from its last checkpoint with: esper resume --checkpoint {run} --nproc-per-node {local}"
                    + ("" if local == size else " and the same --nnodes and rendezvous options"))
        else:
            then = "it had written no checkpoint to continue from"
        if not stalled:
            return distributed.PeerLost(Problem("distributed", f"rank {world.rank} lost contact with another rank "
                                                f"({reason}): that rank's process ended or the connection to it "
                                                f"broke, so the run stops; {then}"))
        absent = world.absent()
        who = "a rank" if not absent else f"rank {absent[0]}" if len(absent) == 1 else \
            f"ranks {', '.join(map(str, absent))}"
        # the same line on every rank that waited, so the launcher shows it once
        return distributed.RankStalled(Problem("distributed", f"{who} did not arrive at a collective within "
                                               f"{world.timeout.total_seconds():g} s (distributed.timeout_s), so the run "
                                               "stops: it is stuck (blocked in its own code such as a data factory, "
                                               f"stopped, or deadlocked) or slower than the timeout; {then}"))

    def _train_step(self) -> StepOutcome:
        cfg = self.loaded.recipe
        morph = self.recorder.telemetry.morph
        count = cfg.trainer.accumulate_steps
        self.optimizer.zero_grad(set_to_none=True)
        batches = micro_batches(self.sampler.next(), count)
        whole = self.whole_graph.model_for(batches[0], self.step) if self.whole_graph is not None else None
        model = whole if whole is not None else self.model if self.replica is None else self.replica.module()
        losses = []
        for index, batch in enumerate(batches):
            losses.append(self._training_pass(model, batch))
            self.precision.backward(losses[-1])
            if index == 0 and count > 1:
                with morph:  # health is measured on the first micro-batch (fp16: its gradients still scaled)
                    self.controller.after_backward()
        average_gradients(self.optimizer, count)
        self.precision.unscale(self.optimizer)
        if count == 1:
            with morph:
                self.controller.after_backward()
        loss = losses[0] if count == 1 else torch.stack([part.detach() for part in losses]).mean()
        if cfg.trainer.grad_clip is not None:
            self.controller.clip_grad_norm_(cfg.trainer.grad_clip)
        optim.apply_lr(self.optimizer, self.step, cfg.trainer)
        self.precision.step(self.optimizer)
        with morph:
            return self.controller.after_step(loss)

    def _training_pass(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """One micro-batch's loss, forward under the run's precision (also what a compile in the
        background trains its copy of the model with)."""
        with self.precision.autocast():
            output, targets = self.task.forward(model, batch, self.device)
            return self.task.loss(output, targets)

    def _validate_and_grow(self) -> bool:
        """Validate, then let the controller snapshot and grow; returns whether it rolled back."""
        with self.precision.autocast():
            val = self.task.evaluate(self.model, self.val_batches, self.device, self.world)
        self.last_val = val.metrics
        self.recorder.validated({"step": self.step, **{f"val_{k}": v for k, v in val.metrics.items()}},
                                float(val.loss or 0.0), val.name, val.metric)
        with self.recorder.telemetry.morph:
            if self.controller.after_validation(val):
                return True
        self.best.observe(self.step, val, self.model, self.manager)
        if self.stopping.observe(self.step, val.metrics):
            self.stopped_early = self.stopping.event(self.step)
            self.recorder.record(self.stopped_early)
        return False

    def _verdict_evaluation(self, model: torch.nn.Module) -> Evaluation:
        with self.precision.autocast():
            return self.task.evaluate(model, self.verdict_batches, self.device, self.world)

    def _report(self, outcome: StepOutcome) -> None:
        self.recorder.notify(progress_event(self.step, self.loaded.recipe.trainer.max_steps, outcome.loss,
                                            self.task.metric, self.last_val, self.parameter_count(),
                                            self.manager.counts(), self.started))

    def save_checkpoint(self) -> Path:
        """Commit a checkpoint of the current state and apply retention."""
        return run_files.save_checkpoint(self)
