"""Growing a model inside your own PyTorch training loop.

You keep your model, optimizer, loss, data and loop; Esper's GrowthController is called at three
points (after backward, after the optimizer step, after validation) and adds seeds where the model
needs capacity, putting their parameters in your optimizer. Checkpoints go through
esper_core.save_checkpoint / load_checkpoint (safetensors + JSON, no pickle) and resume bit-exactly.

    python examples/own_loop.py                      # train 600 steps, print what grew
    python examples/own_loop.py --out ckpt --checkpoint-every 300 --stop-at 300
    python examples/own_loop.py --out ckpt --resume               # continue from step 300

The task: a random ReLU teacher (40 -> 64 -> 64 -> 10) that this small student underfits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import esper_core
from esper_core import Evaluation, GrowthController


class Student(nn.Module):
    """Your model: nothing Esper-specific in it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(40, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def teacher_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs drawn with ``seed`` and the labels one fixed random ReLU network gives them."""
    weights = torch.Generator().manual_seed(12345)
    layers = [torch.randn(40, 64, generator=weights) * (2 / 40) ** 0.5,
              torch.randn(64, 64, generator=weights) * (2 / 64) ** 0.5, torch.randn(64, 10, generator=weights)]
    x = torch.randn(n, 40, generator=torch.Generator().manual_seed(seed))
    h = F.relu(F.relu(x @ layers[0]) @ layers[1])
    return x, (h @ layers[2]).argmax(dim=1)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Evaluation:
    """Your validation pass; per-sample scores let Esper tell a real effect of a seed from noise."""
    was_training = model.training
    model.eval()
    logits = model(x)
    model.train(was_training)
    correct = (logits.argmax(dim=1) == y).double()
    return Evaluation(metric=float(correct.mean()), higher_is_better=True, name="accuracy",
                      loss=float(F.cross_entropy(logits, y)), scores=correct)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="checkpoint directory")
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--stop-at", type=int, default=None, help="leave the loop after this step (as a crash "
                        "would), to resume later")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    x_train, y_train = teacher_data(8000, seed=1)
    x_val, y_val = teacher_data(1000, seed=2)
    model = Student()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    growth = GrowthController(
        model, optimizer, example=x_train[:2], max_steps=args.steps, seed=args.seed,
        seeds={"targets": ["fc1", "fc2"], "blueprints": ["wide_mlp"], "incubation_steps": 60,
               "blend_steps": 60, "probation_steps": 30},
        policy={"trigger": "periodic", "period_steps": 100, "growth_window": [0.1, 0.7]},
        evaluate=lambda m: evaluate(m, x_val, y_val))
    start = 0
    if args.resume:
        start = int(esper_core.load_checkpoint(args.out, model=model, optimizer=optimizer, growth=growth)["step"])

    for step in range(start, args.stop_at or args.steps):
        batch = torch.randint(len(x_train), (128,), generator=torch.Generator().manual_seed(args.seed * 100_003 + step))
        loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        growth.after_backward()
        optimizer.step()
        growth.after_step(loss)
        if (step + 1) % 50 == 0:
            growth.after_validation(evaluate(model, x_val, y_val))
        if args.out is not None and args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            esper_core.save_checkpoint(args.out, model=model, optimizer=optimizer, growth=growth,
                                       extra={"step": step + 1})
    growth.close()

    final = evaluate(model, x_val, y_val)
    grown = [e for e in growth.recorder.events if e["event"] in ("germinate", "blend", "fossilize", "cull")]
    for event in grown:
        print(f"step {event['step']}: {event['event']} {event['blueprint']} in {event['layer']}#{event['slot']}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out / "final.safetensors"))
    print(json.dumps({"val_accuracy": final.metric, "params": sum(p.numel() for p in model.parameters()),
                      "added_params": growth.added_parameters(), "events": len(growth.recorder.events)}))


if __name__ == "__main__":
    main()
