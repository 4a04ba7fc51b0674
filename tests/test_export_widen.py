"""Span seeds exported as genuinely wider layers (issue 12: "a fossilized span seed can be merged into
a genuinely wider pair of host layers"), and kept as branches, with the reason, where a wider network
would compute something else.

Three short runs grow ``span_linear`` seeds on every hidden layer and the head (forced growth: periodic
trigger, every seed kept): the zoo MLP (ReLU between its layers, as in the seed), an MLP with tanh
between its layers (``factories:tanh_mlp``), where the seed's ReLU units are not units of the host, and
a ReLU MLP whose forward asserts its hidden width (``factories:checked_mlp``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from esper_core import load_run
from esper_core.export.load import open_run
from esper_core.export.run import held_out_inputs
from esper_core.recipe.schema import ModelConfig
from esper_core.training.models import build_model
from esper_core.training.trainer import Trainer
from run_helpers import esper

RECIPE = """\
run: {{name: {name}, seed: 0, device: cpu}}
data: {{source: digits, layout: flat, batch_size: 32}}
model: {model}
seeds:
  targets: {targets}
  blueprints: [span_linear]
  per_layer: 2
  rank: 4
  incubation_steps: 10
  blend_steps: 10
  probation_steps: 5
  fossilize_margin: -1.0
policy: {{trigger: periodic, period_steps: 15, growth_window: [0.05, 0.7], max_seeds: 8, merit_ratio: 0.0,
          max_germinations: 4}}
trainer: {{max_steps: 200, lr: 0.01, eval_every: 10, log_every: 10}}
telemetry: {{progress: none}}
storage: {{workspace: "{workspace}"}}
"""
MODELS = {"relu": ("{arch: mlp, widths: [16, 16]}", '["layers.*", "head"]'),
          "tanh": ("{arch: factory, factory: 'factories:tanh_mlp'}", '["type:Linear"]'),
          "checked": ("{arch: factory, factory: 'factories:checked_mlp'}", '["type:Linear"]')}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trainer]:
    root = tmp_path_factory.mktemp("spans")
    trained = {}
    for name, (model, targets) in MODELS.items():
        path = root / f"{name}.yaml"
        path.write_text(RECIPE.format(name=name, model=model, targets=targets, workspace=root / "workspace"),
                        encoding="utf-8")
        trainer = Trainer.from_recipe(path, [f"run.output_dir={root / 'runs'}"])
        trainer.fit()
        trained[name] = trainer
    return trained


def _export(trainer: Trainer, fmt: str, *extra: str) -> dict[str, Any]:
    done = esper("export", trainer.run_dir, "--format", fmt, "--json", *extra)
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def _fossilized_spans(trainer: Trainer) -> dict[str, int]:
    """Fossilized span seeds per layer."""
    return {name: sum(s.state.name == "FOSSILIZED" and s.source is not None for s in layer.slots)
            for name, layer in trainer.manager.layers.items()}


def test_a_grown_relu_mlp_exports_as_a_plain_wider_mlp_the_zoo_model_loads(runs: dict[str, Trainer]) -> None:
    trainer = runs["relu"]
    spans = _fossilized_spans(trainer)
    assert spans["layers.1"] >= 1 and spans["head"] >= 1  # both hidden layers grew
    result = _export(trainer, "safetensors")
    assert result["within_tolerance"]
    seeds = [s for s in result["seeds"] if s["state"] == "FOSSILIZED"]
    assert seeds and all(s["action"] == "widened" and "units added to" in s["reason"] for s in seeds)
    arch = json.loads((Path(result["out"]) / "architecture.json").read_text(encoding="utf-8"))
    widths = [16 + 4 * spans["layers.1"], 16 + 4 * spans["head"]]  # rank 4: each seed adds 4 hidden units
    assert arch["rebuild_model"]["widths"] == widths and not arch["grown_layers"]
    assert arch["widened_layers"] == {"layers.0": [widths[0], 64], "layers.1": [widths[1], widths[0]],
                                      "head": [10, widths[1]]}
    # the zoo MLP has biases: only the widths change, and the one-line note points at rebuild_model
    assert {name: (c["bias_added"], c["weight"]) for name, c in arch["changed_layers"].items()} == \
        {name: (False, shape) for name, shape in arch["widened_layers"].items()}
    assert len(result["notes"]) == 1 and "architecture.json's rebuild_model builds them" in result["notes"][0]
    # each new unit brings its incoming weights and bias and its outgoing weights (the seeds' output
    # biases add to the hosts'); the dense wider layers.1 also holds a block of zeros: the new units of
    # the second hidden layer never read the new units of the first
    new_0, new_1 = 4 * spans["layers.1"], 4 * spans["head"]
    added = new_0 * (64 + 1 + 16) + new_1 * (16 + 1 + 10) + new_1 * new_0
    assert result["parameters"]["exported"] == result["parameters"]["host"] + added
    state = load_file(str(Path(result["out"]) / "model.safetensors"))
    assert torch.count_nonzero(state["layers.1.weight"][16:, 16:]) == 0
    data = trainer.data
    wider = build_model(ModelConfig(**arch["rebuild_model"]), data.input_shape, data.num_classes)
    wider.load_state_dict(state, strict=True)
    x = held_out_inputs(open_run(trainer.run_dir), 256)
    with torch.no_grad():
        diff = (wider.eval()(x) - load_run(trainer.run_dir)(x)).abs().max()
    assert diff <= result["tolerance"]
    pt2 = _export(trainer, "pt2")
    assert pt2["within_tolerance"] and all(s["action"] == "widened" for s in pt2["seeds"] if s["state"] == "FOSSILIZED")


def test_span_seeds_stay_branches_where_the_hosts_activation_is_not_theirs(runs: dict[str, Trainer]) -> None:
    trainer = runs["tanh"]
    assert sum(_fossilized_spans(trainer).values()) >= 2
    result = _export(trainer, "safetensors")
    assert result["within_tolerance"]
    seeds = [s for s in result["seeds"] if s["state"] == "FOSSILIZED"]
    assert seeds and all(s["action"] == "branch" for s in seeds)
    reasons = {s["reason"] for s in seeds}
    assert any("outputs differ by" in r for r in reasons), reasons  # tried and refused by the check
    arch = json.loads((Path(result["out"]) / "architecture.json").read_text(encoding="utf-8"))
    assert arch["grown_layers"] and not arch["widened_layers"] and arch["rebuild_model"] is None


def test_no_merge_keeps_span_seeds_as_branches(runs: dict[str, Trainer]) -> None:
    result = _export(runs["relu"], "safetensors", "--no-merge")
    assert result["within_tolerance"]
    assert all(s["action"] == "branch" for s in result["seeds"] if s["state"] == "FOSSILIZED")


def test_a_model_that_cannot_run_wider_keeps_its_span_seeds_as_branches(runs: dict[str, Trainer]) -> None:
    """Any failure of the user's forward on the wider layers (here an assert) means "keep the branches",
    never a traceback: the export completes and is exact."""
    result = _export(runs["checked"], "pt2")
    assert result["within_tolerance"]
    seeds = [s for s in result["seeds"] if s["state"] == "FOSSILIZED"]
    assert seeds and all(s["action"] == "branch" for s in seeds)
    assert any("fails on the example inputs (AssertionError" in s["reason"] for s in seeds), seeds


def test_the_export_summary_line_counts_widened_seeds(runs: dict[str, Trainer], tmp_path: Path) -> None:
    """`esper export` without --json names what it did with every seed: the widened span seeds too (the
    line once said "0 merged, 0 kept as branches, 0 left out" for a model whose eight seeds were all
    widened)."""
    from typing import get_args

    from esper_cli.export import SEED_ACTIONS
    from esper_core.export.plain import SeedAction

    assert set(SEED_ACTIONS) == set(get_args(SeedAction))  # every action the export takes has its words
    trainer = runs["relu"]
    spans = sum(_fossilized_spans(trainer).values())
    done = esper("export", trainer.run_dir, "--format", "safetensors", "--out", tmp_path / "plain")
    assert done.exit_code == 0, done.output
    line = next(line for line in done.stdout.splitlines() if line.startswith("parameters: "))
    assert f"{spans} widened into wider hosts" in line, line
    counted = sum(int(part.split()[0]) for part in line.split("(seeds: ")[1].rstrip(")").split(", "))
    assert counted == len(json.loads((tmp_path / "plain" / "export.json").read_text(encoding="utf-8"))["seeds"])


def test_unwrap_names_an_example_the_model_cannot_run(runs: dict[str, Trainer]) -> None:
    """`unwrap(model, example=...)` runs the example through the grown model before it widens span seeds; an
    example of the wrong width (or not a tensor at all) surfaced as the model's own traceback ("mat1 and mat2
    shapes cannot be multiplied", "'str' object has no attribute 'flatten'"). It is a ConfigError naming unwrap,
    the example's shape and the model's error (kept as the cause), as GrowthController's is; the right example
    still widens."""
    from esper_core import ConfigError, unwrap

    model = load_run(runs["relu"].run_dir)
    for example, shape in ((torch.randn(3, 7), "(3, 7)"), ("pixels", "str")):
        with pytest.raises(ConfigError, match=rf"^unwrap: example: the model cannot run an example of shape "
                                              rf"{re.escape(shape)}: ") as caught:
            unwrap(model, example=example)
        assert caught.value.__cause__ is not None
    inputs = held_out_inputs(open_run(runs["relu"].run_dir), 64)
    _, seeds = unwrap(model, example=inputs)
    assert any(s.action == "widened" for s in seeds)
