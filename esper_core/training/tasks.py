"""Tasks: how a batch reaches the model, what its output is judged against, and which metric counts.

A batch is an ``(inputs, targets)`` pair or a dict whose ``task.target_key`` entry is the target and
whose other entries are the model's keyword arguments (``input_ids``, ``attention_mask``, ...).
Inputs may be a tensor, a tuple of arguments or a dict. Model outputs may be a tensor, a tuple or
list (the first element), a dict (``logits``) or an object with ``.logits`` (Hugging Face).

Each task gives a mean-reduced training loss and, for evaluation, per-sample scores (higher is
better) that counterfactual verdicts pair up: correctness for classification, negative squared error
for regression, negative mean token loss (or token accuracy) per sequence for token tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from esper_core.distributed.world import World
from esper_core.errors import RECIPE_FIELD, ConfigError, Problem, one_line
from esper_core.growth.evaluation import Evaluation
from esper_core.recipe.diagnostics import Locator, validation_problems
from esper_core.recipe.schema import TaskConfig
from esper_core.seeds.probe import call_model, eval_mode, to_device

_DEFAULT_METRIC = {"classification": "accuracy", "regression": "rmse", "language_model": "perplexity",
                   "token_classification": "token_accuracy", "custom": "loss"}
HIGHER_IS_BETTER = {"accuracy": True, "token_accuracy": True, "r2": True, "rmse": False, "perplexity": False,
                     "loss": False}


def split_batch(batch: Any, target_key: str) -> tuple[Any, torch.Tensor]:
    """(model inputs, targets) of one batch."""
    if isinstance(batch, Mapping):
        if target_key not in batch:
            raise KeyError(f"the batch has no {target_key!r} entry (keys: {', '.join(map(str, batch))}); "
                           "set task.target_key")
        return {k: v for k, v in batch.items() if k != target_key}, batch[target_key]
    inputs, targets = batch
    return inputs, targets


def logits_of(output: Any) -> torch.Tensor:
    """The prediction tensor inside whatever the model returned."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        return next(v for v in output.values() if isinstance(v, torch.Tensor))
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return logits_of(output[0])
    raise TypeError(f"cannot find the prediction in a model output of type {type(output).__name__}")


@dataclass
class _Sums:
    """Running sums of one evaluation pass, kept on the device until the end."""

    loss: torch.Tensor
    count: int = 0
    scores: list[torch.Tensor] = field(default_factory=list)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, key: str, value: torch.Tensor) -> None:
        self.extra[key] = self.extra[key] + value if key in self.extra else value


def _reduced(sums: _Sums, world: World) -> _Sums:
    """The sums of every rank's shard (one all-reduce, and one gather of the per-sample scores)."""
    keys = sorted(sums.extra)
    parts = [sums.loss.reshape(1).double(), sums.loss.new_tensor([float(sums.count)]),
             *(sums.extra[k].double().reshape(-1) for k in keys)]
    total = world.sum(torch.cat(parts)).split([p.numel() for p in parts])
    extra = {k: v.reshape(sums.extra[k].shape) for k, v in zip(keys, total[2:])}
    scores = [world.gather(torch.cat(sums.scores))] if sums.scores else []
    return _Sums(total[0].reshape(()), int(total[1]), scores, extra)


class Task:
    """One recipe ``task`` section made executable (the section, or a dict of its keys, such as
    ``Task({"kind": "regression"})`` in a user's own loop). ``function`` is the custom loss, when any."""

    def __init__(self, config: TaskConfig | Mapping[str, Any],
                 function: Callable[[Any, torch.Tensor], torch.Tensor] | None = None) -> None:
        if not isinstance(config, TaskConfig):
            try:
                config = TaskConfig.model_validate(dict(config))
            except ValidationError as exc:
                raise ConfigError(validation_problems(exc, Locator("Task", {}, ()), TaskConfig)) from None
        self.config = config
        self.kind = config.kind
        self.metric = config.metric or _DEFAULT_METRIC[config.kind]
        self.higher_is_better = HIGHER_IS_BETTER[self.metric]
        self.function = function

    # --- training ---------------------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[Any, torch.Tensor]:
        """(model output, targets) of a batch moved to ``device``."""
        inputs, targets = split_batch(batch, self.config.target_key)
        return call_model(model, to_device(inputs, device, True)), to_device(targets, device, True)

    def loss(self, output: Any, targets: torch.Tensor) -> torch.Tensor:
        """The mean-reduced training loss."""
        if self.kind == "custom":
            assert self.function is not None
            return self.function(output, targets)
        pred, y = self._aligned(logits_of(output), targets)
        if self.kind == "regression":
            return self._regression_loss(pred, y).mean()
        return F.cross_entropy(pred, y, ignore_index=self.config.ignore_index,
                               label_smoothing=self.config.label_smoothing)

    def check_fit(self, model: nn.Module, batch: Any) -> None:
        """One forward pass and loss on ``batch`` (a few training samples), in eval mode without
        gradients, before anything is wrapped or written: a model, task and data that do not fit
        together (token ids into an MLP, sequences for a classification loss, a custom loss that is
        not a scalar) are one located recipe error (exit 2), from ``esper train`` and ``--dry-run``
        alike, instead of a traceback at the first step."""
        field = "task.function" if self.kind == "custom" else "task.kind"
        try:
            with torch.no_grad(), eval_mode(model):
                output, targets = self.forward(model, batch, next(model.parameters()).device)
                loss = self.loss(output, targets)
        except Exception as error:  # whatever the model's or the loss's own code raises
            raise ConfigError(Problem(RECIPE_FIELD, f"the model, task '{self.kind}' and data do not fit together: "
                                      f"{one_line(error)}", field=field)) from None
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ConfigError(Problem(RECIPE_FIELD, f"the loss must be one scalar tensor (got {shape})", field=field))

    def _aligned(self, pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions and targets as the loss wants them: (N, C) logits and (N,) classes, or (N, D) values."""
        if self.kind == "regression":
            pred = pred.float().reshape(pred.shape[0], -1)
            return pred, y.to(pred.dtype).reshape(pred.shape)
        if self.kind == "language_model":  # position t predicts token t + 1
            pred, y = pred[:, :-1], y[:, 1:]
        if self.kind in ("language_model", "token_classification"):
            return pred.reshape(-1, pred.shape[-1]), y.reshape(-1)
        return pred, y

    def _regression_loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-element loss (mean it for the training loss)."""
        if (self.config.loss or "mse") == "huber":
            return F.huber_loss(pred, y, reduction="none", delta=self.config.huber_delta)
        return (pred - y) ** 2

    # --- evaluation -------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any], device: torch.device | None = None,
                 world: World | None = None) -> Evaluation:
        """The task's metrics over ``batches`` in eval mode (one host-device sync at the end), on
        ``device`` (default: where the model's parameters are). Under torchrun each rank passes its
        shard's batches and ``world``: the sums are added over the ranks and the per-sample scores
        gathered in rank order, so every rank gets the whole set's figures."""
        if device is None:
            device = next(model.parameters()).device
        sums = _Sums(torch.zeros((), device=device, dtype=torch.float64))
        with eval_mode(model):
            for batch in batches:
                output, targets = self.forward(model, batch, device)
                self._accumulate(sums, output, targets)
        if world is not None:
            sums = _reduced(sums, world)
        return self._finish(sums)

    def _accumulate(self, sums: _Sums, output: Any, targets: torch.Tensor) -> None:
        if self.kind == "custom":
            n = int(targets.shape[0]) if targets.dim() else 1
            sums.loss += self.loss(output, targets).double() * n
            sums.count += n
            return
        raw = logits_of(output)
        pred, y = self._aligned(raw, targets)
        if self.kind == "regression":
            per_element = self._regression_loss(pred, y)
            squared = (pred - y) ** 2
            sums.loss += per_element.sum().double() / pred.shape[1]
            sums.count += pred.shape[0]
            sums.scores.append(-squared.mean(dim=1).double())
            sums.add("sse", squared.sum(dim=0).double())
            sums.add("y", y.sum(dim=0).double())
            sums.add("y2", (y.double() ** 2).sum(dim=0))
            return
        # the plain negative log-likelihood: label smoothing shapes training only, and a smoothed
        # loss would make "perplexity" (and every verdict and plateau read from it) another number
        per_item = F.cross_entropy(pred, y, ignore_index=self.config.ignore_index, reduction="none").double()
        valid = y != self.config.ignore_index
        correct = (pred.argmax(dim=-1) == y) & valid
        if self.kind == "classification":
            sums.loss += per_item.sum()
            sums.count += y.numel()
            sums.scores.append(correct.double())
            return
        # token tasks: one score per sequence (tokens of a sequence are not independent samples)
        sequences = raw.shape[0]
        valid_seq = valid.reshape(sequences, -1).double()
        tokens = valid_seq.sum(dim=1).clamp_min(1.0)
        nll_seq = (per_item * valid).reshape(sequences, -1).sum(dim=1)
        correct_seq = correct.reshape(sequences, -1).double().sum(dim=1)
        sums.loss += nll_seq.sum()
        sums.count += int(valid.sum())
        sums.add("correct", correct_seq.sum())
        sums.scores.append(correct_seq / tokens if self.metric == "token_accuracy" else -nll_seq / tokens)

    def _finish(self, sums: _Sums) -> Evaluation:
        count = max(sums.count, 1)
        loss = float(sums.loss) / count
        scores = torch.cat(sums.scores).cpu() if sums.scores else None
        metrics: dict[str, float] = {"loss": loss}
        if self.kind == "classification":
            metrics["accuracy"] = float(scores.sum()) / count if scores is not None else 0.0
        elif self.kind == "regression":
            sse, y, y2 = (sums.extra[k] for k in ("sse", "y", "y2"))
            sst = (y2 - y * y / count).sum()
            metrics["rmse"] = math.sqrt(float(sse.sum()) / (count * sse.numel()))
            metrics["r2"] = 1.0 - float(sse.sum()) / float(sst) if float(sst) > 0 else 0.0
        elif self.kind in ("language_model", "token_classification"):
            metrics["perplexity"] = math.exp(min(loss, 700.0))
            metrics["token_accuracy"] = float(sums.extra.get("correct", torch.zeros(()))) / count
        return Evaluation(metrics[self.metric], self.higher_is_better, self.metric, loss, scores, metrics)
