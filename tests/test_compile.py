"""torch.compile and growth: no seed event recompiles the model. Blend weights and the incubation
switch are tensors, and the seed path runs eagerly between compiled host regions, so a seed appearing,
blending, going on probation or being fossilized leaves every compiled frame valid. Counted with
dynamo's own frame counter on a real training loop driven by the growth controller, and checked
against the eager model's output."""

from __future__ import annotations

from pathlib import Path

import torch
import torch._dynamo
import torch._dynamo.testing
import torch.nn.functional as F
from torch import nn

from esper_core import Evaluation, GrowthController
from esper_core.compiler.store import LocalKernelStore
from esper_core.seeds.lifecycle import SeedState
from esper_core.seeds.manager import SlotRef


def test_no_seed_event_recompiles_the_model(tmp_path: Path) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))

    def evaluate(m: nn.Module) -> Evaluation:
        with torch.no_grad():
            logits = m(x)
        correct = (logits.argmax(1) == y).double()
        return Evaluation(float(correct.mean()), True, "accuracy", float(F.cross_entropy(logits, y)), correct)

    growth = GrowthController(model, optimizer, example=x[:2], max_steps=400, evaluate=evaluate,
                              store=LocalKernelStore(tmp_path / "kernels"),
                              seeds={"targets": ["0"], "blueprints": ["wide_mlp"], "incubation_steps": 20,
                                     "blend_steps": 20, "probation_steps": 20, "fossilize_margin": -1e6},
                              policy={"trigger": "periodic", "period_steps": 10_000, "growth_window": [0.0, 1.0],
                                      "merit_every": 100_000})
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter)
    ref = SlotRef("0", 0)
    frames_by_state: dict[SeedState, set[int]] = {}
    for step in range(90):
        state = growth.manager.state(ref)  # the topology this step's forward runs
        loss = F.cross_entropy(compiled(x), y)
        frames_by_state.setdefault(state, set()).add(counter.frame_count)
        optimizer.zero_grad()
        loss.backward()
        growth.after_backward()
        optimizer.step()
        growth.after_step(loss)
        if step == 0:
            growth.after_validation(evaluate(model))  # germinates the seed
    assert growth.manager.state(ref) == SeedState.FOSSILIZED
    assert set(frames_by_state) == {SeedState.DORMANT, SeedState.TRAINING, SeedState.BLENDING,
                                    SeedState.PROBATION, SeedState.FOSSILIZED}
    # Every step ran the frames compiled at step 0, whatever the seed's state.
    assert set().union(*frames_by_state.values()) == frames_by_state[SeedState.DORMANT], frames_by_state
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
