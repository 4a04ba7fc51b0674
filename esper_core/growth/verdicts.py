"""The counterfactual verdict: keep a seed or cull it, by what muting it does to held-out results.

The seed is judged in the task's metric (accuracy for classification), not in validation loss:
cross-entropy rises with over-confidence while accuracy still improves, and judging on it culled
seeds that helped (measured on MNIST-1D: 25 of 34 culled seeds had a non-negative accuracy gain).

The rule is noise-aware and keeps what is not clearly harmful. With per-sample scores (the same
held-out samples with the seed on and muted) the paired differences give the gain's mean and its
standard error; the seed is culled only when even the upper end of the one-sided confidence bound,
``gain + z * stderr``, is below ``margin`` (default 0: the seed is culled when it clearly hurts). A
held-out set of 270 samples cannot tell a 0.3-point difference from noise, and this rule says so
instead of acting on it. The loss stays as a guard against blow-ups: a seed with which the held-out
loss is non-finite, or more than ``loss_guard`` times worse than without it, is culled whatever the
metric says. Every number the rule used goes into the event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from torch import nn

from esper_core.growth.evaluation import Evaluate, Evaluation
from esper_core.seeds.kasmina import KasminaLayer

RULE = ("cull when the upper confidence bound of the metric gain is below the margin, or when the "
        "held-out loss with the seed is non-finite or more than loss_guard worse than without it")


@dataclass(frozen=True)
class Counterfactual:
    """The same held-out evaluation with the seed on and muted."""

    with_seed: Evaluation
    without_seed: Evaluation

    @property
    def loss_gain(self) -> float:
        """How much muting the seed raises the loss (positive: the seed helps)."""
        if self.with_seed.loss is None or self.without_seed.loss is None:
            return float("nan")
        return self.without_seed.loss - self.with_seed.loss

    @property
    def metric_gain(self) -> float:
        """How much the seed improves the metric, oriented so that positive means it helps."""
        return self.with_seed.better() - self.without_seed.better()


class Counterfactuals:
    """Counterfactuals of several seeds of one model in a row. The evaluation with every seed on is
    shared until the caller says the model changed (a seed culled): seeds judged at the same step
    (dense growth judges a layer's seeds together) cost N + 1 held-out evaluations instead of 2N.
    The evaluation is deterministic (the same held-out batches, no randomness), so sharing it changes
    no verdict. A fossilized seed leaves the function as it was (a merged linear seed up to rounding),
    so the shared evaluation stays the state every seed of the round is judged against."""

    def __init__(self, model: nn.Module, evaluate: Evaluate) -> None:
        self.model, self.evaluate = model, evaluate
        self._with_seeds: Evaluation | None = None

    def of(self, layer: KasminaLayer, index: int) -> Counterfactual:
        if self._with_seeds is None:
            self._with_seeds = self._evaluation()
        with layer.muted(index):
            without_seed = self._evaluation()
        return Counterfactual(self._with_seeds, without_seed)

    def _evaluation(self) -> Evaluation:
        """The user's ``evaluate(model)``, checked: what it returns is read far from where it was made."""
        found = self.evaluate(self.model)
        if not isinstance(found, Evaluation):
            raise TypeError("evaluate(model) must return an esper_core.Evaluation(metric, higher_is_better, name, "
                            f"loss, scores), not {type(found).__name__}")
        return found

    def changed(self) -> None:
        """The model's function changed (a seed left it): the next counterfactual evaluates it anew."""
        self._with_seeds = None


def paired_gain(result: Counterfactual) -> tuple[float, float, int]:
    """(mean gain, its standard error, samples) from per-sample scores, or the metric's own
    difference with an unknown (zero) standard error when the evaluation gives no scores."""
    a, b = result.with_seed.scores, result.without_seed.scores
    if a is None or b is None or a.numel() != b.numel() or a.numel() == 0:
        return result.metric_gain, 0.0, 0
    diff = a.double().flatten() - b.double().flatten()
    n = diff.numel()
    stderr = float(diff.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0
    return float(diff.mean()), stderr, n


def judge(result: Counterfactual, margin: float, confidence: float, loss_guard: float) -> tuple[bool, dict[str, Any]]:
    """(keep?, evidence for the event); see the module docstring."""
    w, wo = result.with_seed, result.without_seed
    gain, stderr, n = paired_gain(result)
    z = NormalDist().inv_cdf(confidence)
    upper = gain + z * stderr
    blew_up = w.loss is not None and wo.loss is not None and (
        not math.isfinite(w.loss) or (math.isfinite(wo.loss) and w.loss > wo.loss * (1.0 + loss_guard)))
    harmful = not math.isfinite(gain) or upper < margin
    evidence = {"rule": RULE, "metric": w.name, "metric_with": w.metric, "metric_without": wo.metric,
                "metric_gain": gain, "stderr": stderr, "samples": n, "confidence": confidence,
                "upper_bound": upper, "margin": margin, "val_loss_with": w.loss, "val_loss_without": wo.loss,
                "loss_gain": result.loss_gain, "loss_guard": loss_guard, "blew_up": blew_up}
    return not (harmful or blew_up), evidence

