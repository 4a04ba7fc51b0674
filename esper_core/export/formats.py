"""Writing a plain model in each export format, and running what was written.

- ``pt2``: a ``torch.export`` program with a dynamic batch dimension (every input tensor's first
  dimension), saved with ``torch.export.save``: ``torch.export.load(path).module()`` runs it with
  PyTorch alone. Esper checks the program in memory and never loads a ``.pt2`` itself.
- ``safetensors``: the plain state dict plus ``architecture.json`` (see :func:`architecture`).
- ``onnx``: the same program converted by PyTorch's ``torch.export``-based ONNX exporter (needs the
  ``[onnx]`` extra: onnx, onnxscript, onnxruntime), checked with onnxruntime.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from esper_core.export.plain import SeedOutcome
from esper_core.extras import require_extra
from esper_core.seeds.probe import call_model

FORMATS = ("pt2", "safetensors", "onnx")
ARCHITECTURE = "architecture.json"


def _args(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(positional, keyword) arguments of one batch of model inputs, as :func:`call_model` passes them."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def export_program(plain: nn.Module, inputs: Any) -> torch.export.ExportedProgram:
    """``torch.export`` of ``plain`` (eval mode) with the batch dimension of every input dynamic. A
    batch of one is traced as the constant 1 and the dynamic dimension then fails to export, so a
    single sample is traced twice over."""
    args, kwargs = _args(inputs)
    if any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] < 2 for v in (*args, *kwargs.values())):
        args, kwargs = tuple(_twice(a) for a in args), {k: _twice(v) for k, v in kwargs.items()}
    batch = torch.export.Dim("batch", min=1)

    def dynamic(value: Any) -> Any:
        return {0: batch} if isinstance(value, torch.Tensor) and value.dim() > 0 else None

    shapes: Any = {k: dynamic(v) for k, v in kwargs.items()} if kwargs else tuple(dynamic(a) for a in args)
    with torch.no_grad(), warnings.catch_warnings():
        # A span seed's feeder hands its input on through an attribute (GrownLayer.kept): a value
        # passed within one forward pass, not state, so it is deliberately not a buffer.
        warnings.filterwarnings("ignore", message=r"The tensor attribute .*\.kept was assigned during export")
        return torch.export.export(plain.eval(), args, kwargs or None, dynamic_shapes=shapes)


def _twice(value: Any) -> Any:
    """A batched input with its samples repeated (anything else as it is)."""
    return torch.cat([value, value]) if isinstance(value, torch.Tensor) and value.dim() > 0 else value


def write_pt2(program: torch.export.ExportedProgram, out: Path) -> list[Path]:
    path = out / "model.pt2"
    torch.export.save(program, str(path))
    return [path]


def write_safetensors(plain: nn.Module, description: dict[str, Any], out: Path) -> list[Path]:
    weights, arch = out / "model.safetensors", out / ARCHITECTURE
    tensors, seen = {}, set()
    for key, value in plain.state_dict().items():  # tied weights (a GPT-2's lm_head and wte) share memory,
        value = value.detach().cpu().contiguous()   # which safetensors refuses: later copies are stored apart
        pointer = (value.untyped_storage().data_ptr(), value.storage_offset())
        tensors[key] = value.clone() if pointer in seen else value
        seen.add(pointer)
    save_file(tensors, str(weights))
    arch.write_text(json.dumps(description, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return [weights, arch]


def rebuild_model(recipe_model: dict[str, Any], plain: nn.Module, original_keys: bool) -> dict[str, Any] | None:
    """The recipe ``model`` section whose zoo network has ``plain``'s state dict: the recipe's own when
    the keys are the original ones, a zoo MLP with its hidden widths read from the (widened) layers when
    every one of them is a plain ``nn.Linear``, else ``None``."""
    if original_keys:
        return recipe_model
    layers = getattr(plain, "layers", None)
    if recipe_model.get("arch") != "mlp" or not isinstance(layers, nn.ModuleList) or \
            not all(type(m) is nn.Linear for m in [*layers, getattr(plain, "head", None)]):
        return None
    return recipe_model | {"widths": [m.out_features for m in layers]}


def load_safetensors_into(module: nn.Module, path: Path) -> nn.Module:
    """``module`` with the exported weights loaded (strict: every key and shape must match)."""
    module.load_state_dict(load_file(str(path)), strict=True)
    return module.eval()


def write_onnx(program: torch.export.ExportedProgram, out: Path) -> list[Path]:
    require_extra("onnx", "ONNX export", source="--format onnx")
    path = out / "model.onnx"
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    onnx_program.save(str(path))
    return [path]


def run_onnx(path: Path, inputs: Any) -> torch.Tensor:
    """The first output of the ONNX model at ``path`` on ``inputs`` (onnxruntime, CPU)."""
    require_extra("onnx", "ONNX checks", source="--format onnx")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    args, kwargs = _args(inputs)
    values = [*args, *kwargs.values()]
    feed = {spec.name: value.detach().cpu().numpy() for spec, value in zip(session.get_inputs(), values)}
    return torch.from_numpy(session.run(None, feed)[0])


def run_program(program: torch.export.ExportedProgram, inputs: Any) -> Any:
    with torch.no_grad():
        return call_model(program.module(), inputs)


def architecture(recipe_model: dict[str, Any], host_model: dict[str, Any], plain: nn.Module,
                 outcomes: list[SeedOutcome], original_keys: bool, merged: bool,
                 changes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON that says how to rebuild the exported state dict: the host network (the recipe's
    ``model`` section and its input/output sizes), ``changed_layers`` (``changes``, from
    :func:`~esper_core.export.plain.changed_layers`: each layer that now has a bias or a shape its host
    class does not build, without which the state dict fails a strict load into that class), the
    layers that span seeds made wider (their new weight shapes, as ``changed_layers`` records them),
    ``rebuild_model`` (the ``model`` section of a zoo network whose state dict this is, when one is: a
    grown MLP whose every seed was merged or widened is a plain, wider MLP) and, per layer that kept
    seeds as branches, the host's geometry and each branch's blueprint IR, target and scale (a
    :class:`GrownLayer` whose branches are built by Esper's blueprint builder from that IR)."""
    grown: dict[str, Any] = {}
    widened: set[str] = set()
    for outcome in outcomes:
        if outcome.action == "widened":
            widened |= {outcome.layer, str(outcome.source)}
        if outcome.action != "branch":
            continue
        entry = grown.setdefault(outcome.layer, {"host": (outcome.target or {}).get("host"), "branches": []})
        entry["branches"].append({"slot": outcome.slot, "blueprint": outcome.blueprint, "scale": outcome.alpha,
                                  "source": outcome.source,
                                  "ir": outcome.ir, "target": outcome.target})
    return {"format": "esper-export", "version": 1, "model": recipe_model, **host_model,
            "merged": merged, "original_keys": original_keys, "grown_layers": grown, "changed_layers": changes,
            "widened_layers": {name: changes[name]["weight"] for name in sorted(widened)},
            "rebuild_model": rebuild_model(recipe_model, plain, original_keys),
            "parameters": sum(p.numel() for p in plain.parameters()),
            "seeds": [o.to_json() | {"ir": None, "target": None} for o in outcomes]}
