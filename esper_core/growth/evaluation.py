"""What an evaluation says about a model: the task's metric, and what verdicts need beyond it.

The growth controller judges seeds counterfactually: the same evaluation with a seed on and with it
muted. It only needs to know which number to compare and which way is better; per-sample scores,
when the evaluation provides them, let the verdict tell a real difference from noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Evaluation:
    """One evaluation pass over held-out data.

    ``metric`` is the task's headline figure (accuracy, RMSE, perplexity, ...), named ``name``, with
    ``higher_is_better`` giving its direction; ``loss`` the mean task loss (the verdicts' guard against
    blow-ups); ``scores`` optional per-sample scores, higher is better, in a fixed sample order (the
    paired evidence verdicts use); ``metrics`` every figure worth reporting.
    """

    metric: float
    higher_is_better: bool
    name: str = "metric"
    loss: float | None = None
    scores: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Numbers as plain floats and scores as a 1-D float64 CPU tensor, whatever the user's
        evaluation computed them as (a 0-d tensor, a list built in Python): verdicts compare them
        later, far from the code that made them, where a wrong type failed inside Esper."""
        if not isinstance(self.higher_is_better, bool):
            raise TypeError("Evaluation(higher_is_better=...): True or False, not "
                            f"{type(self.higher_is_better).__name__}")
        object.__setattr__(self, "metric", _number(self.metric, "metric"))
        if self.loss is not None:
            object.__setattr__(self, "loss", _number(self.loss, "loss"))
        if self.scores is not None:
            try:
                scores = torch.as_tensor(self.scores).detach().flatten().double().cpu()
            except (TypeError, ValueError, RuntimeError):
                raise TypeError("Evaluation(scores=...): one number per held-out sample (a tensor or a list), "
                                f"not {type(self.scores).__name__}") from None
            object.__setattr__(self, "scores", scores)

    def better(self) -> float:
        """The metric oriented so that larger is better."""
        return self.metric if self.higher_is_better else -self.metric


def _number(value: Any, argument: str) -> float:
    """``value`` (a Python or NumPy number, or a one-element tensor) as a float."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach())
    if isinstance(value, (str, bool, torch.Tensor)) or not hasattr(value, "__float__"):
        raise TypeError(f"Evaluation({argument}=...): one number (a float or a one-element tensor), "
                        f"not {type(value).__name__}")
    return float(value)


Evaluate = Callable[[nn.Module], Evaluation]
"""A function that evaluates the model on the same held-out samples every time it is called."""
