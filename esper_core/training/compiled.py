"""``trainer.compile``: how a model with Kasmina layers is handed to ``torch.compile``.

On one device ``esper train`` compiles only passes in which every layer is its host alone, as one
graph. In the seed-path variant (what DDP wraps) each wrapped layer ends its compiled region at the
eager seed path (see ``esper_core.seeds.kasmina._seed_path_boundary``), so the code of
``KasminaLayer.forward`` and of every frame above it is compiled once per distinct layer shape.
With PyTorch's defaults that goes wrong twice: after the second shape, automatic dynamic shapes
recompile those frames with symbolic sizes (slower kernels for every later step), and past
``recompile_limit`` specialisations (8) a frame silently falls back to eager. On an H200 the CNN of
``benchmarks/throughput.py`` ran at 0.61 of the plain compiled loop that way before a single seed
existed. So the model is compiled with static shapes, and the limit is raised to hold one
specialisation per wrapped layer (the batch size of a training step never changes, so static shapes
cost no recompile during training).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def compile_model(model: nn.Module, mode: str, wrapped_layers: int, backend: Any = "inductor") -> nn.Module:
    """``torch.compile(model, mode=mode)`` with static shapes and room for ``wrapped_layers`` variants
    (``recompile_limit`` is process-wide in PyTorch: it is only ever raised). ``mode`` applies to the
    inductor backend; another ``backend`` (a dynamo backend callable) is used as given."""
    import torch._dynamo.config as dynamo_config

    room = 3 * wrapped_layers + 8  # every layer shape, the frames resumed above each break, the whole graph
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, room)
    if backend == "inductor":
        return torch.compile(model, mode=mode, dynamic=False)
    return torch.compile(model, backend=backend, dynamic=False)
