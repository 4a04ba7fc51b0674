"""torch.compile and growth: no seed event recompiles the model. Blend weights and the incubation
switch are tensors, and the seed path runs eagerly between compiled host regions, so a seed appearing,
blending, going on probation or being fossilized leaves every compiled frame valid. Counted with
dynamo's own frame counter on a real training loop driven by the growth controller, and checked
against the eager model's output."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch._dynamo.testing
import torch.nn.functional as F
from torch import nn

from esper_core import Evaluation, GrowthController, wrap
from esper_core.compiler.store import LocalKernelStore
from esper_core.seeds import kasmina
from esper_core.seeds.lifecycle import SeedState
from esper_core.seeds.manager import SlotRef
from esper_core.training.compiled import compile_model


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


def _shapes_of_compiled_graphs(run: Callable[[Any], None]) -> list[bool]:
    """Whether each graph dynamo compiles while ``run(backend)`` trains has symbolic sizes."""
    symbolic: list[bool] = []

    def backend(gm: torch.fx.GraphModule, inputs: list[Any]) -> Callable[..., Any]:
        values = [node.meta.get("example_value") for node in gm.graph.nodes if node.op == "placeholder"]
        symbolic.append(any(isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and any(
            isinstance(size, torch.SymInt) for size in v.shape)) for v in values))
        return gm.forward

    torch._dynamo.reset()
    run(backend)
    return symbolic


def test_esper_compiles_a_model_of_many_layer_shapes_statically_without_falling_back(caplog) -> None:
    """Ten wrapped layers of different widths: plain torch.compile turns them dynamic (slower kernels)
    and exceeds its recompile limit (eager fallback); ``trainer.compile`` must do neither."""
    widths = [8 + 2 * i for i in range(11)]
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers)
    wrap(model, targets=[str(2 * i) for i in range(10)], per_layer=1)
    x = torch.randn(16, widths[0])

    def train(compiled: nn.Module) -> None:
        for _ in range(3):
            compiled(x).square().mean().backward()

    plain = _shapes_of_compiled_graphs(lambda backend: train(torch.compile(model, backend=backend)))
    assert any(plain), "plain torch.compile no longer goes dynamic here: this test lost its point"
    caplog.clear()
    with caplog.at_level("WARNING", logger="torch._dynamo"):
        ours = _shapes_of_compiled_graphs(lambda backend: train(compile_model(model, "default", 10, backend)))
    assert ours and not any(ours)
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]
    torch.testing.assert_close(compile_model(model, "default", 10, "eager")(x), model(x))


def test_an_idle_model_compiles_as_one_graph_and_switching_variants_never_recompiles(tmp_path: Path) -> None:
    """While every layer is idle the whole-graph wrapper runs the model without a break per wrapped
    layer; a live seed needs the seed-path wrapper; alternating between them recompiles neither."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    manager = wrap(model, targets=["0", "2"], per_layer=1)
    whole_count, split_count = torch._dynamo.testing.CompileCounter(), torch._dynamo.testing.CompileCounter()
    whole, split = compile_model(model, "default", 2, whole_count), compile_model(model, "default", 2, split_count)
    x = torch.randn(32, 8)
    assert all(layer.idle() for layer in manager.layers.values())
    try:
        for step in range(6):
            flag = step % 2 == 0
            kasmina.compile_whole_graph(flag)
            (whole if flag else split)(x).sum().backward()
            if step == 1:
                split_frames = split_count.frame_count
        assert whole_count.frame_count == 1  # one graph: no break at either wrapped layer, compiled once
        assert split_count.frame_count == split_frames > 1  # a break at each wrapped layer, compiled once
        kasmina.compile_whole_graph(True)
        torch.testing.assert_close(whole(x), model(x))
    finally:
        kasmina.compile_whole_graph(False)
    manager.germinate(SlotRef("2", 0), "wide_mlp", "test", 0)
    manager.start_incubation(SlotRef("2", 0), nn.Linear(16, 16))
    assert not manager.layers["2"].idle() and manager.layers["0"].idle()
    torch.testing.assert_close(split(x), model(x))
