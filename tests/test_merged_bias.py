"""A biased seed merged into a bias-free host gives the host a bias a freshly built host lacks: every way
a grown model comes back (load_run from final/ or a checkpoint, esper export, resume, load_grown and
load_checkpoint of a user's own loop) must rebuild it. Widening a bias-free pair with a span seed gives
both layers biases too. An export's plain state dict then does not load strictly into the user's class
as built: the export records which layers differ (``changed_layers``) and says so in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

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


def _fit(tmp_path_factory: pytest.TempPathFactory, name: str, recipe: str) -> Trainer:
    root = tmp_path_factory.mktemp(name)
    (root / "recipe.yaml").write_text(recipe, encoding="utf-8")
    trainer = Trainer.from_recipe(root / "recipe.yaml", [f"run.output_dir={root / 'runs'}"])
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    trainer = _fit(tmp_path_factory, "merged-bias", RECIPE)
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


SPAN_RECIPE = """\
run: {name: nobias-span, seed: 0, device: cpu}
data: {source: digits, layout: flat, batch_size: 32}
model: {arch: factory, factory: "factories:bias_free_mlp"}
seeds: {targets: ["type:Linear"], per_layer: 1, blueprints: [span_linear], rank: 4, incubation_steps: 10,
        blend_steps: 10, probation_steps: 5}
policy: {trigger: periodic, period_steps: 20, growth_window: [0.05, 0.6], max_seeds: 2}
trainer: {max_steps: 80, lr: 0.01, eval_every: 10, log_every: 10}
telemetry: {progress: none}
"""
"""A span seed (4 new ReLU units with biases) between the two bias-free layers, kept at the default margin."""


@pytest.fixture(scope="module")
def spanned(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    trainer = _fit(tmp_path_factory, "span-bias", SPAN_RECIPE)
    assert [s.state.name for s in trainer.manager.layers["3"].slots] == ["FOSSILIZED"], "the span seed must be kept"
    return trainer


def _export(trainer: Trainer, fmt: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``esper export`` of the run's final model: its printed output, export.json and architecture.json."""
    out = trainer.run_dir.parent / f"export-{fmt}"
    done = esper("export", trainer.run_dir, "--format", fmt, "--out", out)
    assert done.exit_code == 0, done.output
    arch = json.loads((out / "architecture.json").read_text(encoding="utf-8")) if fmt == "safetensors" else {}
    return done.output, json.loads((out / "export.json").read_text(encoding="utf-8")), arch


def _built_as(model: nn.Module, changes: dict[str, Any]) -> nn.Module:
    """What docs/export.md tells a user to do with their own class before a strict load: give each layer
    that ``changed_layers`` names the recorded weight and bias shapes (the values come from the file)."""
    for name, change in changes.items():
        layer = model.get_submodule(name)
        layer.weight = nn.Parameter(torch.zeros(change["weight"]))
        if change["bias"] is not None:
            layer.bias = nn.Parameter(torch.zeros(change["bias"]))
    return model


def _loads_into_the_users_class(trainer: Trainer, arch: dict[str, Any], model: nn.Module) -> None:
    """The state dict fails a strict load into the class as built (the user's symptom), and loads into it
    once the layers ``changed_layers`` names are built so, computing what the trained model computes."""
    state = load_file(str(trainer.run_dir.parent / "export-safetensors" / "model.safetensors"))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        bias_free_mlp((64,), 10).load_state_dict(state, strict=True)
    fitted = _built_as(model, arch["changed_layers"])
    fitted.load_state_dict(state, strict=True)
    x = _inputs()
    with torch.no_grad():
        assert torch.allclose(fitted.eval()(x), load_run(trainer.run_dir)(x), atol=1e-5)


def test_a_safetensors_export_names_the_layers_that_gained_a_bias(trained: Trainer) -> None:
    output, result, arch = _export(trained, "safetensors")
    assert result["within_tolerance"] and not result["original_keys"]
    expected = {"1": {"bias_added": True, "weight": [16, 64], "bias": [16], "host_weight": [16, 64], "host_bias": None},
                "3": {"bias_added": True, "weight": [10, 16], "bias": [10], "host_weight": [10, 16], "host_bias": None}}
    assert arch["changed_layers"] == expected and result["changed_layers"] == expected
    assert not arch["grown_layers"] and not arch["widened_layers"]
    assert len(result["notes"]) == 1 and "1: bias (16) added; 3: bias (10) added" in result["notes"][0]
    assert "note: model.safetensors does not load strictly into the host model class" in output
    _loads_into_the_users_class(trained, arch, bias_free_mlp((64,), 10))


def test_a_pt2_export_records_the_changed_layers_and_needs_no_note(trained: Trainer) -> None:
    output, result, _ = _export(trained, "pt2")
    assert result["within_tolerance"] and set(result["changed_layers"]) == {"1", "3"}
    assert result["notes"] == [] and "note:" not in output  # the program carries its own biases


def test_widening_a_bias_free_pair_is_recorded_with_its_new_shapes_and_biases(spanned: Trainer) -> None:
    output, result, arch = _export(spanned, "safetensors")
    assert result["within_tolerance"]
    assert [s["action"] for s in result["seeds"] if s["state"] == "FOSSILIZED"] == ["widened"]
    expected = {"1": {"bias_added": True, "weight": [20, 64], "bias": [20], "host_weight": [16, 64], "host_bias": None},
                "3": {"bias_added": True, "weight": [10, 20], "bias": [10], "host_weight": [10, 16], "host_bias": None}}
    assert arch["changed_layers"] == expected and arch["widened_layers"] == {"1": [20, 64], "3": [10, 20]}
    assert "1: bias (20) added, weight 16x64 -> 20x64; 3: bias (10) added, weight 10x16 -> 10x20" in output
    _loads_into_the_users_class(spanned, arch, bias_free_mlp((64,), 10, width=20))


def test_load_run_gives_back_a_run_whose_span_seed_spans_a_bias_free_pair(spanned: Trainer) -> None:
    x = _inputs()
    with torch.no_grad():
        assert torch.allclose(load_run(spanned.run_dir)(x), spanned.model.eval()(x), atol=1e-6)


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
            policy={"trigger": "periodic", "period_steps": 5, "growth_window": [0.0, 0.8],
                    "merit_ratio": 0.0})  # both layers grow (and get a host bias)

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
