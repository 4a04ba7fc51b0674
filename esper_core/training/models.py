"""The host-network zoo: the models a recipe's ``model`` section names.

Seeds are attached by wrapping named submodules (``seeds.targets`` globs such as ``layers.*`` or
``blocks.*.conv1``), so every layer a user may want to grow is its own ``nn.Linear``/``nn.Conv2d``
module with a short, stable name; numbered containers hold only layers (activations are applied
functionally), so ``layers.1`` is the second hidden layer whatever the dropout setting.
Wrappable layers:

- ``mlp``: ``layers.0`` .. ``layers.{n-1}`` (hidden Linear layers, one per width) and ``head``.
- ``cnn``: ``stem.conv``; per block ``i``: ``blocks.i.conv1``, ``blocks.i.conv2`` and, where the
  block changes shape (every block after the first), the 1x1 projection ``blocks.i.shortcut``; ``head``.
- ``transformer``: a causal language model (:mod:`.transformer`): ``blocks.i.attn.qkv``,
  ``blocks.i.attn.proj``, ``blocks.i.mlp.fc``, ``blocks.i.mlp.proj``; ``head``.

Parameters are initialised from torch's global RNG: seed it before building (the trainer does).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from esper_core.errors import RECIPE_FIELD, ConfigError, Problem
from esper_core.recipe.schema import ModelConfig
from esper_core.training.data import call_factory, import_factory
from esper_core.training.transformer import CausalLM


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The host network for per-sample inputs of ``input_shape`` and ``num_classes`` outputs (classes,
    regression targets, or the vocabulary of a language model)."""
    if cfg.arch == "mlp":
        return MLP(math.prod(input_shape), cfg.widths, num_classes, cfg.dropout)
    if cfg.arch == "transformer":
        if len(input_shape) != 1:
            raise ConfigError(Problem(RECIPE_FIELD, f"'transformer' needs token-id sequences (length,) but the data "
                                      f"gives samples of shape {tuple(input_shape)}; use `data.source: text`",
                                      field="model.arch"))
        return CausalLM(num_classes, input_shape[0], cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.dropout)
    if cfg.arch == "cnn":
        if len(input_shape) != 3:
            raise ConfigError(Problem(RECIPE_FIELD, f"'cnn' needs image inputs (C, H, W) but the data gives "
                                      f"samples of shape {tuple(input_shape)}; set `data.layout: image`",
                                      field="model.arch"))
        return ResNetCNN(input_shape[0], cfg.channels, num_classes, cfg.dropout)
    return _from_factory(cfg, tuple(input_shape), num_classes)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters: the size measure growth is charged against."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class MLP(nn.Module):
    """Flatten, then Linear -> ReLU (-> Dropout) per hidden width, then a Linear ``head``."""

    def __init__(self, in_features: int, widths: list[int], num_classes: int, dropout: float) -> None:
        super().__init__()
        sizes = [in_features, *widths]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = self.dropout(F.relu(layer(x)))
        return self.head(x)


class ResidualBlock(nn.Module):
    """Two 3x3 conv+BN layers around an identity, or a 1x1 conv+BN projection when the shape changes.

    ``shortcut`` is absent (None) for identity blocks so a glob such as ``blocks.*.shortcut`` matches
    only real convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Conv2d | None = None
        self.shortcut_bn: nn.BatchNorm2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut_bn(self.shortcut(x))
        return F.relu(out + identity)


class ResNetCNN(nn.Module):
    """A small ResNet: 3x3 stem, one residual block per stage (stride 2 after the first), pool, head."""

    def __init__(self, in_channels: int, channels: list[int], num_classes: int, dropout: float) -> None:
        super().__init__()
        self.stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(channels[0]),
            relu=nn.ReLU(),
        ))
        widths = [channels[0], *channels]
        self.blocks = nn.ModuleList(ResidualBlock(a, b, stride=1 if i == 0 else 2)
                                    for i, (a, b) in enumerate(zip(widths, widths[1:])))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.dropout(x.mean(dim=(2, 3))))


def _from_factory(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A user's model: ``factory(input_shape=..., num_classes=..., **factory_kwargs)`` -> nn.Module."""
    spec = str(cfg.factory)
    reserved = {"input_shape", "num_classes"} & cfg.factory_kwargs.keys()
    if reserved:
        raise ConfigError(Problem(RECIPE_FIELD, f"{sorted(reserved)} are passed by Esper from the data; "
                                  "remove them", field="model.factory_kwargs"))
    kwargs = {"input_shape": input_shape, "num_classes": num_classes, **cfg.factory_kwargs}
    model = call_factory(import_factory(spec, "model.factory"), spec, "model.factory", kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(Problem(RECIPE_FIELD, f"'{spec}' returned {type(model).__name__}; expected a "
                                  "torch.nn.Module", field="model.factory"))
    return model
