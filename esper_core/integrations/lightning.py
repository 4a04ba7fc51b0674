"""Growth inside ``lightning.Trainer``: a thin Callback over the growth controller.

    trainer = lightning.Trainer(max_steps=3000, callbacks=[EsperGrowth(example=x[:2], evaluate=evaluate,
                                                                       seeds={"targets": ["net.fc*"]})])
    trainer.fit(module, data)

The hooks map one to one onto the controller's three calls: ``on_after_backward`` ->
``after_backward``, the end of a batch whose optimizer step ran -> ``after_step(loss)``, the end of a
validation epoch -> ``after_validation(evaluate(module))``. Seeds' parameters get a group of their own in
the optimizer ``configure_optimizers`` returned (the first one), and the learning-rate schedulers it
returned for that optimizer are extended to cover it. The trainer's fp16 loss scaler and its
``accumulate_grad_batches`` (Lightning divides each micro-batch's loss by it) reach the controller,
so an incubating seed's pull is scaled and averaged like the gradient it joins.

Checkpoints: the callback's state (tensors and JSON values, the seed topology among them) travels in
Lightning's checkpoint. Lightning loads a module's weights before any callback hook runs, and a grown
module has keys the freshly built one lacks, so when fitting resumes from a checkpoint the callback
makes that first load non-strict, then rebuilds the recorded seeds and loads the weights again,
strictly, before the optimizer (whose seed groups it re-creates) gets its state back. Outside a fit
(``LightningModule.load_from_checkpoint``, ``Trainer.validate/test/predict(ckpt_path=...)``) no
callback takes part: the only hook Lightning calls before loading the weights is the module's own
``on_load_checkpoint``, so the module calls :func:`rebuild_seeds` there.

Use the callback's ``clip_grad_norm`` rather than ``Trainer(gradient_clip_val=...)``: Lightning's norm
clipping would let an incubating seed's gradient change the host's update, so the callback refuses it
(clipping by value is per element, and allowed).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from esper_core.errors import CheckpointError, Problem
from esper_core.export.grown import regrow
from esper_core.growth.controller import GrowthController, check_max_norm
from esper_core.growth.evaluation import Evaluate
from esper_core.seeds.kasmina import KasminaLayer

STATE_KEY = "EsperGrowth"
"""The callback's entry in a checkpoint's ``callbacks`` (a subclass keeps it, so :func:`rebuild_seeds` finds it)."""


class EsperGrowth(pl.Callback):
    """``example``: one input of the module's ``forward`` (as the training step passes it), to learn
    the shape each wrapped layer sees; ``evaluate(module)``: validation on fixed held-out samples
    (returns an :class:`~esper_core.growth.evaluation.Evaluation`; without it no seed leaves
    probation); ``max_steps``: defaults to ``Trainer(max_steps=...)``, one of the two must be given;
    ``clip_grad_norm``: isolation-safe clipping.
    Other keywords go to :class:`~esper_core.growth.controller.GrowthController`."""

    def __init__(self, *, example: Any, evaluate: Evaluate | None = None, max_steps: int | None = None,
                 clip_grad_norm: float | None = None, **controller: Any) -> None:
        self.example, self.evaluate, self.max_steps = example, evaluate, max_steps
        self.clip = None if clip_grad_norm is None else check_max_norm(clip_grad_norm, "EsperGrowth(clip_grad_norm=...)")
        self.options = controller
        self.growth: GrowthController | None = None
        self._steps_seen = 0
        self._strict: bool | None = None

    # --- set-up and checkpoints -------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.growth is not None:
            return
        clip = trainer.gradient_clip_val
        if clip and trainer.gradient_clip_algorithm in (None, "norm"):  # by value mixes nothing: allowed
            raise ValueError(f"EsperGrowth: Trainer(gradient_clip_val={clip}) clips incubating seeds together with "
                             "the host by one norm, so a seed's gradient changes the host's update; clip with "
                             f"EsperGrowth(clip_grad_norm={clip}) instead, which clips them apart")
        if any(isinstance(module, KasminaLayer) for module in pl_module.modules()):
            raise ValueError("EsperGrowth: the module has grown already (e.g. it comes from load_from_checkpoint); to "
                             "continue its growth, fit a freshly built module with ckpt_path=...; to fine-tune it "
                             "without growth, fit it without EsperGrowth (or esper_core.unwrap it first)")
        max_steps = self.max_steps or (trainer.max_steps if trainer.max_steps > 0 else None)
        if max_steps is None:
            raise ValueError("EsperGrowth needs max_steps (give it, or Trainer(max_steps=...))")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.growth = GrowthController(pl_module, None, example=self.example, max_steps=max_steps,
                                       evaluate=self.evaluate, start=False, scaler=scaler,
                                       accumulate_steps=trainer.accumulate_grad_batches, **self.options)
        # A resumed fit loads the weights before any callback hook: let that load pass, and load them
        # again (with the module's own strictness) once the seeds exist (on_load_checkpoint).
        self._strict, pl_module.strict_loading = pl_module.strict_loading, False

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        assert self.growth is not None
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state:
            self.growth.load_state_dict(state)
        pl_module.load_state_dict(checkpoint["state_dict"], strict=bool(self._strict))
        self._restore_strictness(pl_module)

    def _restore_strictness(self, pl_module: pl.LightningModule) -> None:
        if self._strict is not None:
            pl_module.strict_loading, self._strict = self._strict, None

    @property
    def state_key(self) -> str:
        return STATE_KEY

    def state_dict(self) -> dict[str, Any]:
        return self.growth.state_dict() if self.growth is not None else {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.growth is not None
        self._restore_strictness(pl_module)
        optimizer = trainer.optimizers[0]
        self.growth.bind_optimizer(optimizer, [config.scheduler for config in trainer.lr_scheduler_configs
                                               if getattr(config.scheduler, "optimizer", None) is optimizer])
        self.growth.start()
        self._steps_seen = trainer.global_step

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.growth is not None:
            self.growth.close()

    # --- the three calls --------------------------------------------------------------------------

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.growth is not None
        self.growth.after_backward()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.clip is not None and self.growth is not None:
            self.growth.clip_grad_norm_(self.clip)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        assert self.growth is not None
        if trainer.global_step == self._steps_seen:  # gradient accumulation: no optimizer step yet
            return
        self._steps_seen = trainer.global_step
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.growth.after_step(loss.detach() if isinstance(loss, torch.Tensor) else None)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.growth is None or not self.growth.started:
            return
        self.growth.after_validation(self.evaluate(pl_module) if self.evaluate is not None else None)


def rebuild_seeds(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Give ``module`` the seeds that a checkpoint of a fit with :class:`EsperGrowth` records, so that
    Lightning can then load the grown weights into it. Call it from the LightningModule's own hook::

        def on_load_checkpoint(self, checkpoint):
            rebuild_seeds(self, checkpoint)

    and ``MyModule.load_from_checkpoint(path)`` and ``Trainer.validate/test/predict(ckpt_path=...)``
    give the grown module back (seeds rebuilt from their recorded blueprint IR: no kernel store or
    compile). A freshly built module is wrapped as the checkpoint records; one wrapped already (the
    trained module, or a fit about to resume) gets the checkpoint's seeds in place of its own. A
    checkpoint of a module that never grew is left to Lightning."""
    state = (checkpoint.get("callbacks") or {}).get(STATE_KEY)
    where = "Lightning checkpoint"
    if not state:
        weights = checkpoint.get("state_dict") or {}
        if any(key.endswith(".host.weight") and key[:-len("host.weight")] + "alpha" in weights for key in weights):
            raise CheckpointError(Problem(where, "it holds a grown model's weights but no EsperGrowth state to "
                                          "rebuild its seeds from (saved with save_weights_only=True?): save "
                                          "whole checkpoints, or esper_core.unwrap the module before saving"))
        return
    regrow(module, state.get("topology"), f"{where} ({STATE_KEY} state)")
