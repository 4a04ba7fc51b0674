"""A biased seed merged into a bias-free host gives the host a bias a freshly built host lacks: every way
a grown model comes back (load_run from final/ or a checkpoint, esper export, resume, load_grown and
load_checkpoint of a user's own loop) must rebuild it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import esper_core
from esper_core import GrowthController, Trainer, load_run
from esper_core.checkpoints import store
from esper_core.compiler.store import LocalKernelStore
from factories import bias_free_mlp
from run_helpers import accuracy_on, copy_at, esper, own_loop

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module

BLUEPRINTS = Path(__file__).parent / "blueprints_biased"
RECIPE = f"""\
run: {{name: nobias, seed: 0, device: cpu}}
data: {{source: digits, layout: flat, batch_size: 32}}
model: {{arch: factory, factory: "factories:bias_free_mlp"}}
seeds: {{targets: ["type:Linear"], per_layer: 1, blueprints: [biased_adapter], blueprint_dirs: ["{BLUEPRINTS}"],
        rank: 4, incubation_steps: 10, blend_steps: 10, probation_steps: 5}}
policy: {{trigger: periodic, period_steps: 20, growth_window: [0.05, 0.6], max_seeds: 2}}
trainer: {{max_steps: 80, lr: 0.01, eval_every: 10, log_every: 10}}
checkpoint: {{every_steps: 40, keep: 3}}
telemetry: {{progress: none}}
"""
"""Two bias-free Linear layers whose seeds merge at steps 35 and 45: the checkpoint of step 40 holds one
merged bias, and a resume from it recreates that one and then merges the other."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    root = tmp_path_factory.mktemp("merged-bias")
    (root / "recipe.yaml").write_text(RECIPE, encoding="utf-8")
    trainer = Trainer.from_recipe(root / "recipe.yaml", [f"run.output_dir={root / 'runs'}"])
    trainer.fit()
    gained = [name for name, p in trainer.model.named_parameters() if name.endswith("host.bias")]
    assert len(gained) == 2, "both bias-free hosts must have gained a bias from a merged seed"
    return trainer


def _inputs() -> torch.Tensor:
    return torch.randn(16, 64, generator=torch.Generator().manual_seed(0))


def test_load_run_gives_back_the_trained_model_from_final_and_from_a_checkpoint(trained: Trainer) -> None:
    x = _inputs()
    with torch.no_grad():
        expected = trained.model.eval()(x)
        assert torch.allclose(load_run(trained.run_dir)(x), expected, atol=1e-6)
        at_40 = load_run(trained.run_dir, store.checkpoint_name(40))
    assert [name for name, _ in at_40.named_parameters() if name.endswith("host.bias")] == ["3.host.bias"]


@pytest.mark.parametrize("fmt", ["pt2", "safetensors"])
def test_esper_export_writes_and_checks_the_merged_bias(trained: Trainer, fmt: str) -> None:
    done = esper("export", trained.run_dir, "--format", fmt, "--out", trained.run_dir.parent / f"export-{fmt}")
    assert done.exit_code == 0, done.output


def test_a_resume_after_one_merge_and_across_another_is_bit_exact(trained: Trainer, tmp_path: Path) -> None:
    copy = copy_at(trained.run_dir, tmp_path, 40)
    Trainer.resume(copy, ["telemetry.progress=none"]).fit()
    whole = load_file(str(trained.run_dir / "final" / "model.safetensors"))
    resumed = load_file(str(copy / "final" / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    shutil.rmtree(copy)


def test_an_own_loop_checkpoint_loads_into_a_fresh_bias_free_model(tmp_path: Path) -> None:
    data = torch.Generator().manual_seed(0)
    x, y = torch.randn(320, 8, generator=data), torch.randint(0, 4, (320,), generator=data)
    evaluate = accuracy_on(x[:64], y[:64])

    def loop(model: nn.Module, max_steps: int) -> tuple[torch.optim.Optimizer, GrowthController]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        return optimizer, GrowthController(
            model, optimizer, example=x[:2], max_steps=max_steps, store=LocalKernelStore(tmp_path / "kernels"),
            evaluate=evaluate, blueprint_dirs=[BLUEPRINTS],
            seeds={"targets": ["type:Linear"], "blueprints": ["biased_adapter"], "incubation_steps": 4,
                   "blend_steps": 4, "probation_steps": 4},
            policy={"trigger": "periodic", "period_steps": 5, "growth_window": [0.0, 0.8]})

    torch.manual_seed(0)
    model = bias_free_mlp((8,), 4)
    optimizer, growth = loop(model, 40)
    own_loop(model, optimizer, growth, x, y, 40, evaluate)
    esper_core.save_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer, growth=growth)
    growth.close()
    assert sum(name.endswith("host.bias") for name, _ in model.named_parameters()) == 2
    with torch.no_grad():
        expected = model.eval()(x)
        assert torch.equal(esper_core.load_grown(tmp_path / "ckpt", model=bias_free_mlp((8,), 4))(x), expected)
    fresh = bias_free_mlp((8,), 4)
    optimizer, growth = loop(fresh, 60)
    esper_core.load_checkpoint(tmp_path / "ckpt", model=fresh, optimizer=optimizer, growth=growth)
    growth.close()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)
