"""The adaptive seed rate under ``lightning.Trainer`` (the EsperGrowth callback): seeds learn at twice
the host's rate until the validation metric's trend stops rising, then no faster than the host's rate
under the user's own per-step scheduler, read from what each optimizer step actually uses. Lightning
steps its scheduler after the end-of-batch hook where the controller sets the seeds' rate, unlike the
own loop of tests/test_seed_rate.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from esper_core import Evaluation  # noqa: E402
from esper_core.compiler.store import LocalKernelStore  # noqa: E402
from esper_core.growth import optimizer as optim  # noqa: E402
from esper_core.integrations.lightning import EsperGrowth  # noqa: E402
from factories import TwoLinear  # noqa: E402
from test_seed_rate import ACCURACIES, SWITCH_AT  # noqa: E402  (the scripted validation curve and its switch)

DATA = torch.Generator().manual_seed(0)
X, Y = torch.randn(320, 8, generator=DATA), torch.randint(0, 4, (320,), generator=DATA)
HOST_LR, STEPS = 0.05, 120


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.host = TwoLinear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.host(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=HOST_LR)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


class StepRates(pl.Callback):
    """(step, host lr, seed lr) as each optimizer step is about to use them."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float | None]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        seeds = optim.seed_group(optimizer)
        self.seen.append((trainer.global_step, optim.host_group(optimizer)["lr"], seeds["lr"] if seeds else None))


def test_lightning_seeds_switch_to_at_most_the_hosts_rate(tmp_path: Any) -> None:
    torch.manual_seed(0)
    scripted = iter(ACCURACIES)
    growth = EsperGrowth(example=X[:2], evaluate=lambda module: Evaluation(next(scripted), True, "accuracy", 1.0, None),
                         store=LocalKernelStore(tmp_path / "kernels"),
                         seeds={"targets": ["host.fc1"], "blueprints": ["wide_mlp"]},
                         policy={"trigger": "periodic", "period_steps": 10, "growth_window": [0.0, 1.0], "max_seeds": 1})
    rates = StepRates()
    trainer = pl.Trainer(max_steps=STEPS, val_check_interval=10, check_val_every_n_epoch=None, limit_val_batches=1,
                         num_sanity_val_steps=0, callbacks=[growth, rates], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=tmp_path)
    data = DataLoader(TensorDataset(X, Y), batch_size=32, shuffle=False)
    trainer.fit(Net(), data, DataLoader(TensorDataset(X[:32], Y[:32]), batch_size=32))

    assert growth.growth is not None
    events = [e for e in growth.growth.recorder.events if e["event"] == "seed_lr"]
    assert [e["step"] for e in events] == [SWITCH_AT]
    live = [(step, host, seed) for step, host, seed in rates.seen if seed is not None]
    before = [seed for step, _, seed in live if step < SWITCH_AT]
    after = [(host, seed) for step, host, seed in live if step >= SWITCH_AT]
    assert before and all(seed == pytest.approx(2 * HOST_LR) for seed in before)
    assert after and all(seed <= host and seed == pytest.approx(host) for host, seed in after), after[:3]


class LambdaNet(Net):
    """A module whose ``configure_optimizers`` returns a scheduler keeping one function per group."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=HOST_LR)
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.99 ** step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def test_lightning_schedulers_and_accumulation_keep_working_as_seeds_arrive(tmp_path: Any) -> None:
    torch.manual_seed(0)
    growth = EsperGrowth(example=X[:2], evaluate=lambda module: Evaluation(0.5, True, "accuracy", 1.0, None),
                         store=LocalKernelStore(tmp_path / "kernels"),
                         seeds={"targets": ["host.fc1"], "blueprints": ["wide_mlp"]},
                         policy={"trigger": "periodic", "period_steps": 10, "growth_window": [0.0, 1.0]})
    trainer = pl.Trainer(max_steps=60, val_check_interval=20, check_val_every_n_epoch=None, limit_val_batches=1,
                         num_sanity_val_steps=0, callbacks=[growth], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=tmp_path, accumulate_grad_batches=2)
    data = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=False)
    trainer.fit(LambdaNet(), data, DataLoader(TensorDataset(X[:32], Y[:32]), batch_size=32))

    assert growth.growth is not None and trainer.global_step == 60
    assert "germinate" in {e["event"] for e in growth.growth.recorder.events}
    optimizer, scheduler = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
    assert len(scheduler.lr_lambdas) == len(scheduler.base_lrs) == len(optimizer.param_groups) == 2
    # Lightning divides each micro-batch's loss by accumulate_grad_batches: the pull is divided alike
    assert all(layer.eta == 2 * growth.growth.seeds_config.eta for layer in growth.growth.manager.layers.values())


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_lightning_s_norm_clipping_is_refused_for_the_callback_s_own(algorithm: str, tmp_path: Any) -> None:
    """Trainer(gradient_clip_val=...) clips the host and incubating seeds by one norm, so a seed's
    gradient changed the host's update; the docs said to use the callback's clip_grad_norm, but
    nothing did. Clipping by value is per element and mixes nothing: it stays allowed."""
    torch.manual_seed(0)
    growth = EsperGrowth(example=X[:2], store=LocalKernelStore(tmp_path / "kernels"),
                         seeds={"targets": ["host.fc1"], "blueprints": ["wide_mlp"]})
    trainer = pl.Trainer(max_steps=4, limit_val_batches=0, callbacks=[growth], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=tmp_path, gradient_clip_val=1.0, gradient_clip_algorithm=algorithm)
    fit = lambda: trainer.fit(Net(), DataLoader(TensorDataset(X, Y), batch_size=32))  # noqa: E731
    if algorithm == "value":
        fit()
        assert trainer.global_step == 4
        return
    with pytest.raises(ValueError, match=r"^EsperGrowth: Trainer\(gradient_clip_val=1.0\) clips incubating seeds "
                                         r"together with the host.*EsperGrowth\(clip_grad_norm=1.0\)"):
        fit()
