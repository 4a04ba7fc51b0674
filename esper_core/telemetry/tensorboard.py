"""``telemetry.tensorboard``: the run's figures as TensorBoard event files in ``<run dir>/tensorboard``.

Scalars: ``train/loss`` and ``train/lr`` every ``log_every`` steps, ``model/params``, ``seeds/<state>``
(slots per lifecycle state), and ``val/<figure>`` after every validation; each chained event as text
under ``events/<name>`` at its step. A resumed run opens the same directory with ``purge_step`` set just
past the checkpoint's step, so TensorBoard hides what the interrupted process wrote after the
checkpoint and the curves show each step once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DIRECTORY = "tensorboard"
_TRAIN = ("loss", "lr")


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run_dir: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / DIRECTORY), purge_step=purge_step)

    def logged(self, row: dict[str, Any]) -> None:
        step = row["step"]
        for key, value in row.items():
            if key == "step" or not isinstance(value, (int, float)):
                continue
            group = "train" if key in _TRAIN else "model" if key == "params" else "seeds"
            self.writer.add_scalar(f"{group}/{key}", value, step)

    def validated(self, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key.startswith("val_"):
                self.writer.add_scalar(f"val/{key.removeprefix('val_')}", value, row["step"])

    def event(self, event: dict[str, Any]) -> None:
        text = json.dumps({k: v for k, v in event.items() if k not in ("seq", "prev")}, sort_keys=True)
        self.writer.add_text(f"events/{event['event']}", f"`{text}`", event.get("step", 0))

    def finished(self, run_dir: Path) -> None:
        self.writer.flush()

    def cursor(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.writer.close()
