"""A LightningModule grown by the EsperGrowth callback, back from Lightning's own checkpoints in the
same process: ``load_from_checkpoint`` and ``Trainer.validate(ckpt_path=...)`` rebuild its seeds
(the module calls ``rebuild_seeds`` from ``on_load_checkpoint``), a fit resumed from a checkpoint keeps
growing to the very model of the uninterrupted fit, and a checkpoint without the callback's state is
one clear error instead of Lightning's list of missing and unexpected keys."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

import esper_core  # noqa: E402
from esper_core.compiler.store import LocalKernelStore  # noqa: E402
from esper_core.errors import CheckpointError  # noqa: E402
from esper_core.integrations.lightning import EsperGrowth, rebuild_seeds  # noqa: E402
from factories import TwoLinear  # noqa: E402
from run_helpers import accuracy_on  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module

DATA = torch.Generator().manual_seed(0)
X, Y = torch.randn(320, 8, generator=DATA), torch.randint(0, 4, (320,), generator=DATA)
STEPS = 40  # ten batches an epoch: the checkpoint at step 20 is at an epoch boundary, where Lightning resumes


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.host = TwoLinear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.host(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.05)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rebuild_seeds(self, checkpoint)


evaluate = accuracy_on(X[:64], Y[:64])


def validation() -> DataLoader:
    return DataLoader(TensorDataset(X[:32], Y[:32]), batch_size=32)


def fit(out: Path, kernels: Path, ckpt_path: Path | None = None) -> tuple[Net, EsperGrowth, Any]:
    """Grow ``host.fc1`` (low-rank seeds, folded in at step 22) and ``host.fc2`` (span seeds) for 40
    steps, checkpointing at steps 20 and 40; resumed from ``ckpt_path`` if given."""
    torch.manual_seed(0)
    growth = EsperGrowth(example=X[:2], evaluate=evaluate, store=LocalKernelStore(kernels),
                         seeds={"targets": ["host.fc1", "host.fc2"], "blueprints": ["lowrank_adapter", "span_linear"],
                                "per_layer": 2, "incubation_steps": 4, "blend_steps": 4, "probation_steps": 4},
                         policy={"trigger": "periodic", "period_steps": 10, "growth_window": [0.0, 0.8]})
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=out, filename="{step}", every_n_train_steps=20, save_top_k=-1)
    trainer = pl.Trainer(max_steps=STEPS, val_check_interval=5, check_val_every_n_epoch=None, limit_val_batches=1,
                         num_sanity_val_steps=0, callbacks=[growth, checkpoints], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", default_root_dir=out)
    module = Net()
    trainer.fit(module, DataLoader(TensorDataset(X, Y), batch_size=32), validation(), ckpt_path=ckpt_path)
    return module, growth, trainer


@dataclass
class Grown:
    """The fitted module and its trainer, the final weights and outputs (copies: a test may load another
    checkpoint into the module), and the directory of the checkpoints at steps 20 and 40."""

    module: Net
    trainer: Any
    weights: dict[str, torch.Tensor]
    outputs: torch.Tensor
    root: Path


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> Grown:
    root = tmp_path_factory.mktemp("lit")
    module, growth, trainer = fit(root / "fit", root / "kernels")
    assert growth.growth is not None
    kept = {(e["layer"], e["step"]) for e in growth.growth.recorder.events if e["event"] == "fossilize"}
    assert kept == {("host.fc2", 17), ("host.fc1", 22)}, growth.growth.recorder.events
    weights = {key: value.clone() for key, value in module.state_dict().items()}
    return Grown(module, trainer, weights, outputs(module), root)


def outputs(module: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return module.eval()(X)


def test_load_from_checkpoint_gives_the_grown_module_back(grown: Grown) -> None:
    module = Net.load_from_checkpoint(grown.root / "fit" / "step=40.ckpt")
    assert module.state_dict().keys() == grown.weights.keys()
    assert any(".seeds." in key for key in module.state_dict())
    assert torch.equal(outputs(module), grown.outputs)

    plain, seeds = esper_core.unwrap(module, example=X[:64])  # the way out: a plain, wider network
    assert {s.action for s in seeds} == {"merged", "widened"} and plain.host.fc1.out_features > 16
    assert float((outputs(plain) - grown.outputs).abs().max()) < 1e-5


def test_validate_with_an_earlier_checkpoint_rebuilds_its_seeds(grown: Grown) -> None:
    """At step 20 fc1's seeds were still modules (in probation), so its checkpoint has another topology
    than the trained module; ``validate(ckpt_path=...)`` loads it into that module as into a new one."""
    earlier = grown.root / "fit" / "step=20.ckpt"
    fresh = pl.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu").validate(
        Net(), validation(), ckpt_path=earlier, verbose=False)
    assert grown.trainer.validate(grown.module, validation(), ckpt_path=earlier, verbose=False) == fresh
    assert any(key.startswith("host.fc1.seeds.") for key in grown.module.state_dict())
    assert torch.equal(outputs(grown.module), outputs(Net.load_from_checkpoint(earlier)))


def test_a_fit_resumed_from_a_checkpoint_keeps_growing_to_the_same_model(grown: Grown) -> None:
    module, growth, trainer = fit(grown.root / "resumed", grown.root / "kernels",
                                  ckpt_path=grown.root / "fit" / "step=20.ckpt")
    assert growth.growth is not None and trainer.global_step == STEPS
    assert [(e["layer"], e["step"]) for e in growth.growth.recorder.events if e["event"] == "fossilize"] \
        == [("host.fc1", 22)] * 2  # growth went on after the resume
    resumed = module.state_dict()
    assert resumed.keys() == grown.weights.keys()
    assert all(torch.equal(resumed[key], grown.weights[key]) for key in resumed), \
        [key for key in resumed if not torch.equal(resumed[key], grown.weights[key])]


def test_a_weights_only_checkpoint_of_a_grown_module_is_one_clear_error(grown: Grown) -> None:
    grown.trainer.save_checkpoint(grown.root / "weights.ckpt", weights_only=True)
    with pytest.raises(CheckpointError, match="no EsperGrowth state to rebuild its seeds from"):
        Net.load_from_checkpoint(grown.root / "weights.ckpt")


def test_growing_a_reloaded_module_again_says_how_to_continue_its_growth(grown: Grown) -> None:
    module = Net.load_from_checkpoint(grown.root / "fit" / "step=40.ckpt")
    trainer = pl.Trainer(max_steps=1, callbacks=[EsperGrowth(example=X[:2])], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=grown.root)
    with pytest.raises(ValueError, match="fit a freshly built module with ckpt_path"):
        trainer.fit(module, DataLoader(TensorDataset(X, Y), batch_size=32))
