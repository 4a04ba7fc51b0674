"""``esper export``: a run's trained model written as pt2, safetensors or ONNX, and checked.

Steps: rebuild the trained model (:func:`~esper_core.export.load.open_run`), make it plain
(:func:`~esper_core.export.plain.unwrap`, merging by default), write the format into ``--out``
(default ``RUN/exports/<format>`` or ``<format>-unmerged``, a checkpoint's with ``-<its name>``),
then run what was written on held-out data (the run's validation split, rebuilt from its recipe)
and compare its outputs with the trained model's. The result says parameters before and after,
file sizes and the largest absolute difference; it fails (exit 1) when that difference exceeds
the tolerance for the model's dtype, scaled by the outputs' magnitude when it exceeds 1
(:data:`TOLERANCE`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esper_core.errors import ConfigError, EsperError, Problem, one_line
from esper_core.export import formats
from esper_core.export.load import LoadedRun, open_run
from esper_core.export.plain import TOLERANCE, changed_layers, unwrap
from esper_core.safe_read import foreign
from esper_core.seeds.probe import call_model

def export_run(target: str | Path, fmt: str, merge: bool = True, out: Path | None = None,
               checkpoint: str | None = None, samples: int = 512, tolerance: float | None = None,
               warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export and check; returns the machine-readable result (what ``--json`` prints)."""
    if fmt not in formats.FORMATS:
        raise ConfigError(Problem("--format", f"unknown format {fmt!r} (choose from {', '.join(formats.FORMATS)})"))
    if fmt == "onnx":  # before any work: a missing extra is one line, at once
        from esper_core.extras import require_extra

        require_extra("onnx", "ONNX export", source="--format onnx")
    warnings: list[str] = []

    def note(message: str) -> None:
        warnings.append(message)
        if warn is not None:
            warn(message)

    run = open_run(target, checkpoint, warn=note)
    inputs, stats = _held_out(run, samples)
    plain, outcomes = unwrap(run.model, merge, example=inputs)
    for outcome in outcomes:
        if outcome.action == "branch" and outcome.state != "FOSSILIZED":
            note(f"warning: {outcome.layer} slot {outcome.slot} ({outcome.blueprint}) is live ({outcome.state.lower()});"
                 f" exported as a branch scaled by its current alpha {outcome.alpha:g}")
    base = run.base_model()
    original_keys = _shapes(plain) == _shapes(base)
    changes = changed_layers(base, plain)
    default = (fmt if merge else f"{fmt}-unmerged") + ("" if checkpoint is None else f"-{run.source.name}")
    directory = prepare_out(out or _own_exports(run.run_dir, default))  # a checkpoint's never replaces final/'s
    dtype = next(run.model.parameters()).dtype
    with torch.no_grad():
        reference = _prediction(call_model(run.model, inputs))
    notes: list[str] = []
    if fmt == "safetensors":
        description = formats.architecture(run.loaded.recipe.model.model_dump(mode="json"), run.host_model, plain,
                                           outcomes, original_keys, merge, changes)
        if changes:  # a plain state dict for the user's own class: say why a strict load of it would fail
            notes.append(changed_layers_note(changes, description["rebuild_model"] is not None))
        files = formats.write_safetensors(plain, description, directory)
        fresh = base if original_keys else _empty_like(plain)
        with torch.no_grad():
            exported = _prediction(call_model(formats.load_safetensors_into(fresh, files[0]), inputs))
    else:
        program = _traced(plain, inputs)
        if fmt == "pt2":
            files = formats.write_pt2(program, directory)
            exported = _prediction(formats.run_program(program, inputs))
        else:
            files = formats.write_onnx(program, directory)
            exported = formats.run_onnx(files[0], inputs)
    diff = float((exported.double() - reference.double()).abs().max()) if reference.numel() else 0.0
    scale = max(1.0, float(reference.double().abs().max())) if reference.numel() else 1.0
    allowed = (tolerance if tolerance is not None else TOLERANCE.get(dtype, 1e-5)) * scale
    result = {
        "run_dir": str(run.run_dir), "source": str(run.source), "step": run.step, "format": fmt, "merge": merge,
        "out": str(directory), "files": [_describe(p) for p in files],
        "parameters": {"host": _count(base), "trained": _count(run.model), "exported": _count(plain)},
        "seeds": [{k: v for k, v in o.to_json().items() if k not in ("ir", "target")} for o in outcomes],
        "original_keys": original_keys, "changed_layers": changes, "notes": notes,
        "samples": int(reference.shape[0]) if reference.dim() else 1,
        "dtype": str(dtype).removeprefix("torch."), "max_abs_diff": diff, "tolerance": allowed,
        "within_tolerance": diff <= allowed, "warnings": warnings,
        # the model was trained on (x - mean) / std (data.standardize): a user feeding raw features needs these
        "input_standardization": None if stats is None else {
            "mean": stats[0].reshape(-1).tolist(), "std": stats[1].reshape(-1).tolist(),
            "shape": list(stats[0].shape), "formula": "(x - mean) / std"},
    }
    (directory / "export.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    from esper_core.artifacts.publish import publish_files

    result["uploaded"] = publish_files(run.run_dir, [*files, directory / "export.json"], run.loaded.recipe.storage)
    return result


def changed_layers_note(changes: dict[str, dict[str, Any]], rebuildable: bool) -> str:
    """One line naming the layers of an exported state dict that its host model class, as built, lacks
    the parameters of (see :func:`~esper_core.export.plain.changed_layers`), and what to do: a strict
    load into that class would otherwise fail with nothing to say why, and dropping an added bias would
    change the model's outputs."""
    parts = []
    for name, change in changes.items():
        details = [f"bias ({_dims(change['bias'])}) added"] if change["bias_added"] else []
        if change["weight"] != change["host_weight"]:
            details.append(f"weight {_dims(change['host_weight'])} -> {_dims(change['weight'])}")
        parts.append(f"{name}: {', '.join(details)}")
    remedy = "architecture.json's rebuild_model builds them so (docs/export.md shows the call)" if rebuildable else \
        "give those layers these shapes before load_state_dict(strict=True) (dropping a bias would change the outputs)"
    return (f"note: model.safetensors does not load strictly into the host model class as built: {'; '.join(parts)} "
            f"(architecture.json: changed_layers); {remedy}")


def _dims(shape: list[int]) -> str:
    return "x".join(str(d) for d in shape)


EXPORT_FILES = frozenset({"export.json", "model.pt2", "model.safetensors", formats.ARCHITECTURE, "model.onnx",
                          "model.onnx.data"})
"""Every file an export writes into its directory (ONNX may keep large weights beside the model)."""


def _own_exports(run_dir: Path, name: str) -> Path:
    """``RUN/exports/NAME``, the default directory of an export, unless a link (or anything but a
    directory) stands in place of it or of ``exports/``: a run directory may come from someone else,
    and an export is written only inside the run, never where a link planted there points (exit 2)."""
    for path in (run_dir / "exports", run_dir / "exports" / name):
        kind = foreign(path, directory=True)
        if kind is not None:
            raise ConfigError(Problem(str(path), f"{kind} in place of the run's own exports directory: an export is "
                                      "written only inside the run, never where a link points; remove it, or "
                                      "choose a directory with --out"))
    return run_dir / "exports" / name


def prepare_out(directory: Path) -> Path:
    """The export's directory, created, or emptied of an earlier export's files. Anything else in it
    (a file of the user's, a run, a subdirectory) makes it refused, so an export never deletes what
    it did not write; so is a path that cannot be a directory."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(Problem("--out", f"{directory} is a file, not a directory"))
    if directory.is_dir():
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in EXPORT_FILES or not p.is_file())
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ConfigError(Problem("--out", f"{directory} holds files an export did not write ({shown}); "
                                      "choose a new or empty directory (an earlier export's directory is reused)"))
        for earlier in directory.iterdir():
            earlier.unlink()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(Problem("--out", f"cannot create {directory}: {error.strerror or error}")) from None
    return directory


def _traced(plain: nn.Module, inputs: Any) -> torch.export.ExportedProgram:
    """``torch.export`` of the plain model, or one error saying why it cannot be traced (exit 1)."""
    try:
        return formats.export_program(plain, inputs)
    except Exception as error:  # torch.export's many failure types: one line, never a traceback
        reason = one_line(error).split(". ")[0]  # its first sentence
        hint = " (a transformers model returns its cache: build it with config.use_cache = False to export it)" \
            if "Cache" in reason else ""
        raise EsperError(Problem("--format", f"torch.export cannot trace the trained model: {reason}{hint}")) from None


def held_out_inputs(run: LoadedRun, samples: int) -> Any:
    """Model inputs of the first ``samples`` validation samples, rebuilt from the run's recipe."""
    return _held_out(run, samples)[0]


def _held_out(run: LoadedRun, samples: int) -> tuple[Any, tuple[torch.Tensor, torch.Tensor] | None]:
    """:func:`held_out_inputs`, and the (mean, std) the run's inputs were standardised with, if any."""
    from esper_core.training.data import build_data
    from esper_core.training.loaders import first_inputs

    recipe = run.loaded.recipe
    with run.loaded.importable():
        data = build_data(recipe.data, recipe.run.seed, run.recipe_dir, recipe.task.kind, recipe.task.target_key)
    inputs = first_inputs(data.val, samples, recipe.task.target_key)
    if isinstance(inputs, dict):
        inputs = {k: v for k, v in inputs.items() if k != recipe.task.target_key}
    return inputs, data.input_stats


def _prediction(output: Any) -> torch.Tensor:
    from esper_core.training.tasks import logits_of

    return logits_of(output).detach().cpu()


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _empty_like(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure with every tensor zeroed: the exported file must fill it."""
    import copy

    fresh = copy.deepcopy(module)
    with torch.no_grad():
        for tensor in fresh.state_dict().values():
            tensor.zero_()
    return fresh


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _describe(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"path": str(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
