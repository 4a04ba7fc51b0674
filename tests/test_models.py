"""The model zoo: output shapes, the documented wrappable layer names, factories and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from esper_core.errors import ConfigError
from esper_core.recipe.schema import ModelConfig
from esper_core.training.models import build_model, count_parameters

TESTS_DIR = Path(__file__).parent


def layer_names(model: nn.Module, kind: type[nn.Module]) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, kind)}


@pytest.mark.parametrize("shape", [(64,), (1, 8, 8)])
def test_mlp_output_shape_and_layer_names(shape: tuple[int, ...]) -> None:
    model = build_model(ModelConfig(arch="mlp", widths=[32, 16], dropout=0.1), shape, 10)
    assert model(torch.randn(5, *shape)).shape == (5, 10)
    assert layer_names(model, nn.Linear) == {"layers.0", "layers.1", "head"}
    assert model.layers[0].in_features == 64 and model.head.in_features == 16


def test_mlp_without_hidden_layers_is_a_linear_classifier() -> None:
    model = build_model(ModelConfig(arch="mlp", widths=[]), (13,), 3)
    assert layer_names(model, nn.Linear) == {"head"}
    assert count_parameters(model) == 13 * 3 + 3


def test_targets_an_mlp_without_hidden_layers_lacks_name_model_widths(tmp_path: Path) -> None:
    # `esper train --dry-run` (in-process, opening no store): it, train and compile --for place the problem alike
    from esper_core.training.dry_run import dry_run

    recipe = tmp_path / "linear.yaml"
    recipe.write_text(f"""\
data: {{source: digits, layout: flat}}
model: {{arch: mlp, widths: []}}
seeds:
  targets: ["layers.*", head]
run: {{output_dir: "{tmp_path / 'runs'}"}}
""", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        dry_run(recipe, [])
    problem, = info.value.problems
    assert (problem.line, problem.field) == (4, "seeds.targets.0")
    assert problem.message.endswith("matchable: head (model.widths is empty: an MLP without hidden layers has only "
                                    "its head to grow)"), problem.message


@pytest.mark.parametrize("channels", [[16, 32], [8, 8, 16]])
def test_cnn_output_shape_on_digit_images(channels: list[int]) -> None:
    model = build_model(ModelConfig(arch="cnn", channels=channels, dropout=0.2), (1, 8, 8), 10)
    out = model(torch.randn(4, 1, 8, 8))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cnn_wrappable_layers_have_the_documented_names() -> None:
    model = build_model(ModelConfig(arch="cnn", channels=[16, 32, 64]), (3, 16, 16), 5)
    assert layer_names(model, nn.Conv2d) == {
        "stem.conv",
        "blocks.0.conv1", "blocks.0.conv2",
        "blocks.1.conv1", "blocks.1.conv2", "blocks.1.shortcut",
        "blocks.2.conv1", "blocks.2.conv2", "blocks.2.shortcut",
    }
    assert layer_names(model, nn.Linear) == {"head"}
    assert model.get_submodule("stem.conv").in_channels == 3
    assert model.get_submodule("blocks.2.shortcut").stride == (2, 2)


def test_cnn_on_flat_inputs_asks_for_the_image_layout() -> None:
    with pytest.raises(ConfigError, match=r"data\.layout: image"):
        build_model(ModelConfig(arch="cnn"), (64,), 10)


def test_count_parameters_counts_trainable_parameters_only() -> None:
    model = build_model(ModelConfig(arch="mlp", widths=[32]), (64,), 10)
    assert count_parameters(model) == (64 * 32 + 32) + (32 * 10 + 10)
    model.head.requires_grad_(False)
    assert count_parameters(model) == 64 * 32 + 32


@pytest.fixture
def factories_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS_DIR))


@pytest.mark.usefixtures("factories_importable")
def test_model_factory_gets_shape_classes_and_kwargs() -> None:
    cfg = ModelConfig(arch="factory", factory="factories:linear_model", factory_kwargs={"bias": False})
    model = build_model(cfg, (1, 8, 8), 10)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert count_parameters(model) == 64 * 10


@pytest.mark.usefixtures("factories_importable")
@pytest.mark.parametrize(("factory", "kwargs", "message"), [
    ("factories:not_a_model", {}, "'factories:not_a_model' returned str; expected a torch.nn.Module"),
    ("no_such_module:make", {}, "cannot import 'no_such_module:make'"),
    ("factories:linear_model", {"depth": 2}, "'factories:linear_model' cannot be called"),
    ("factories:linear_model", {"num_classes": 2}, "passed by Esper"),
])
def test_model_factory_problems_are_config_errors(
        factory: str, kwargs: dict[str, object], message: str) -> None:
    cfg = ModelConfig(arch="factory", factory=factory, factory_kwargs=kwargs)
    with pytest.raises(ConfigError) as excinfo:
        build_model(cfg, (4,), 2)
    assert message in str(excinfo.value)
