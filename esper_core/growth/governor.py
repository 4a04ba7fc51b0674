"""The governor: notices a loss that has gone bad and rolls the run back to a known-good state.

It judges the losses the loop already reads (every ``check_every`` steps) plus a flag that
accumulates non-finite losses on the device between reads, so it adds no host-device sync of its
own. A spike is ``spike_reads`` consecutive read losses above ``mean + zscore * std`` of the recent
window: growth perturbs the loss a little by design, so the threshold is statistical rather than a
fixed ratio, and it must persist because one batch's loss is heavy-tailed once training fits the data
(a model at loss 0.005 meets single batches at 0.05: a "6 sigma" read that is not a fault). While a
read is suspicious no snapshot is taken, so a confirmed spike still rolls back to a state judged
before it.

The governor owns its snapshot (the last state it judged healthy) and its suspects (the seeds changed
at the most recent step that changed any: one seed, or every seed of a layer grown densely, which
change state together), and both are part of its state dict, so a resumed run rolls back exactly as the
uninterrupted run would have. A snapshot is taken only right after a healthy judgement of the same
step: a state that has not been judged is never "known good".
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import torch

from esper_core.errors import EsperError
from esper_core.growth.state import State
from esper_core.recipe.schema import GovernorConfig
from esper_core.seeds.manager import Event, SlotRef

_CHANGES = ("germinate", "blend", "probation", "fossilize")


class GovernorStop(EsperError):
    """Too many rollbacks: the run cannot make progress and stops."""

    exit_code = 5


class Governor:
    def __init__(self, config: GovernorConfig, device: torch.device) -> None:
        self.config = config
        self.history: deque[float] = deque(maxlen=config.window)
        self.rollbacks = 0
        self.snapshot: State | None = None
        self.suspects: list[SlotRef] = []
        self._suspect_step = -1  # the step the suspects changed at
        self.judged_step = -1  # the step of the last healthy judgement
        self.suspicious = 0  # consecutive reads above the spike limit so far
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        # The sum of the losses since the last fold: non-finite exactly when one of them was (float64
        # cannot overflow on float32 losses), and one kernel per step where the flag update took three.
        self._sum = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def watch(self, loss: torch.Tensor) -> None:
        """Called every step: remember (on the device) whether any loss was NaN/Inf."""
        self._sum.add_(loss.detach())

    def _fold(self) -> None:
        """Move what :meth:`watch` accumulated into the flag (before the flag is read or saved)."""
        self._nonfinite |= ~torch.isfinite(self._sum)
        self._sum.zero_()

    def agree(self, any_rank: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Under torchrun, before a judgement: a non-finite loss seen by any rank counts on every rank
        (``any_rank`` ORs a flag over the ranks), so all of them roll back together."""
        self._fold()
        self._nonfinite = any_rank(self._nonfinite)

    def judge(self, step: int, loss_value: float) -> str | None:
        """At a read point: the reason to roll back, or ``None`` if training is healthy."""
        if not self.config.enabled:
            return None
        self._fold()
        if bool(self._nonfinite) or not math.isfinite(loss_value):
            return f"non-finite loss ({loss_value}) since the last check"
        if len(self.history) >= max(3, self.config.window // 2):
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
            limit = mean + self.config.zscore * max(std, 1e-8)
            if loss_value > limit:
                self.suspicious += 1
                if self.suspicious < self.config.spike_reads:
                    return None  # not judged healthy either: no snapshot of this state
                return (f"loss spike: {self.suspicious} reads above mean {mean:.4g} + {self.config.zscore:g} x "
                        f"std {std:.3g} (last {loss_value:.4g})")
        self.suspicious = 0
        self.history.append(loss_value)
        self.judged_step = step
        return None

    def keep(self, step: int, state: State) -> bool:
        """Take ``state`` as the known-good snapshot if ``step`` was just judged healthy."""
        if not self.config.enabled or self.judged_step != step:
            return False
        self.snapshot = state
        return True

    def noticed(self, event: Event) -> None:
        """Track the seeds changed most recently: the suspects when the loss goes bad. Seeds that
        change at the same step are equally suspect (blaming only the last one recorded would let its
        siblings' blueprints off)."""
        if event["event"] in _CHANGES:
            if event["step"] != self._suspect_step:
                self.suspects, self._suspect_step = [], int(event["step"])
            ref = SlotRef(event["layer"], event["slot"])
            if ref not in self.suspects:
                self.suspects.append(ref)

    def rolled_back(self) -> None:
        """Count a rollback; past the limit the run stops."""
        self.rollbacks += 1
        self._nonfinite.zero_()
        self._sum.zero_()
        self.history.clear()
        self.suspicious = 0
        if self.rollbacks > self.config.max_rollbacks:
            raise GovernorStop(f"governor: {self.rollbacks} rollbacks (limit {self.config.max_rollbacks}); "
                               "training cannot recover, stopping")

    def state_dict(self) -> State:
        self._fold()
        return {"history": list(self.history), "rollbacks": self.rollbacks, "judged_step": self.judged_step,
                "suspicious": self.suspicious, "suspects": [[ref.layer, ref.index] for ref in self.suspects],
                "suspect_step": self._suspect_step,
                "nonfinite": self._nonfinite.clone(), "snapshot": self.snapshot}

    def load_state_dict(self, state: State) -> None:
        self.history = deque((float(v) for v in state["history"]), maxlen=self.config.window)
        self.rollbacks = int(state["rollbacks"])
        self.judged_step = int(state["judged_step"])
        self.suspicious = int(state.get("suspicious", 0))
        if "suspects" in state:
            self.suspects = [SlotRef(str(layer), int(index)) for layer, index in state["suspects"]]
            self._suspect_step = int(state["suspect_step"])
        else:  # a checkpoint from before dense growth: one suspect
            old = state.get("suspect")
            self.suspects = [SlotRef(str(old[0]), int(old[1]))] if old else []
            self._suspect_step = -1
        self._nonfinite = state["nonfinite"].to(self._nonfinite.device).bool()
        self._sum.zero_()
        self.snapshot = state["snapshot"]
