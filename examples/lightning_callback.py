"""Growing a LightningModule with the EsperGrowth callback (pip install 'esper-morph[lightning]').

The module and the data are ordinary Lightning code; the callback adds seeds where the model needs
capacity, judges them on the validation samples, and travels in Lightning's checkpoints:

    python examples/lightning_callback.py --out runs/lit                 # 640 steps
    python examples/lightning_callback.py --out runs/lit --stop-at 320   # stop early, as a crash would
    python examples/lightning_callback.py --out runs/lit --resume        # continue from the checkpoint

Lightning resumes a plain DataLoader only at an epoch boundary (64 steps here), so stop there. The
module's ``on_load_checkpoint`` rebuilds the grown seeds, so ``Classifier.load_from_checkpoint(
"runs/lit/last.ckpt")`` gives the grown model back (docs/export.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from esper_core import Evaluation
from esper_core.integrations.lightning import EsperGrowth, rebuild_seeds


def teacher_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs drawn with ``seed`` and the labels one fixed random ReLU network gives them."""
    weights = torch.Generator().manual_seed(12345)
    layers = [torch.randn(40, 64, generator=weights) * (2 / 40) ** 0.5,
              torch.randn(64, 64, generator=weights) * (2 / 64) ** 0.5, torch.randn(64, 10, generator=weights)]
    x = torch.randn(n, 40, generator=torch.Generator().manual_seed(seed))
    return x, (F.relu(F.relu(x @ layers[0]) @ layers[1]) @ layers[2]).argmax(dim=1)


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rebuild_seeds(self, checkpoint)  # a grown checkpoint's seeds, before Lightning loads its weights


@torch.no_grad()
def evaluate(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Evaluation:
    was_training = module.training
    module.eval()
    logits = module(x)
    module.train(was_training)
    correct = (logits.argmax(dim=1) == y).double()
    return Evaluation(float(correct.mean()), True, "accuracy", float(F.cross_entropy(logits, y)), correct)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=640)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    x_train, y_train = teacher_data(8000, seed=1)
    x_val, y_val = teacher_data(1000, seed=2)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=125, shuffle=False)  # 64 steps an epoch
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=1000)
    module = Classifier()
    growth = EsperGrowth(example=x_train[:2], evaluate=lambda m: evaluate(m, x_val, y_val), max_steps=args.steps,
                         seeds={"targets": ["net.0", "net.2"], "blueprints": ["wide_mlp"], "incubation_steps": 60,
                                "blend_steps": 60, "probation_steps": 30},
                         policy={"trigger": "periodic", "period_steps": 100, "growth_window": [0.1, 0.7]})
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=args.out, filename="last", save_last=False, save_top_k=1,
                                               every_n_train_steps=args.stop_at or args.steps)
    trainer = pl.Trainer(max_steps=args.stop_at or args.steps, val_check_interval=40, check_val_every_n_epoch=None,
                         callbacks=[growth, checkpoints], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(module, train, val, ckpt_path=args.out / "last.ckpt" if args.resume else None)
    assert growth.growth is not None
    kinds = sorted({e["event"] for e in growth.growth.recorder.events if "layer" in e})
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(args.out / "final.safetensors"))
    print(json.dumps({"val_accuracy": evaluate(module, x_val, y_val).metric, "events": kinds,
                      "added_params": growth.growth.added_parameters(), "step": trainer.global_step}))


if __name__ == "__main__":
    main()
