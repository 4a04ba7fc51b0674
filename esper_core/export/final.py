"""A run's ``final/`` directory: the trained model's weights and seed topology, with a manifest.

``final/model.safetensors`` holds the model's state dict (Kasmina key names: ``layers.0.host.weight``,
``layers.0.seeds.1.0.weight``, ``layers.0.alpha``), ``final/topology.json`` the seed topology
(:meth:`SeedManager.topology`: per slot its state and, for seeds, the blueprint IR and target they
are rebuilt from), and ``final/manifest.json`` the sha256 and size of both plus what rebuilding the
host model needs besides the recipe (the per-sample input shape and the number of outputs, so the
data need not be read again). The manifest is written last and atomically: a ``final/`` without one
was never finished (or was written by an Esper older than the manifest; it loads with a warning).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from esper_core.checkpoints.store import file_entries, read_verified
from esper_core.durable import replace_atomically
from esper_core.errors import CheckpointError, Problem

FINAL = "final"
MODEL = "model.safetensors"
TOPOLOGY = "topology.json"
MANIFEST = "manifest.json"
FORMAT = 1
MAX_MANIFEST_BYTES = 1 << 20


@dataclass(frozen=True)
class FinalModel:
    """A verified ``final/``: the state dict, the topology and the manifest (``{}`` for an old run)."""

    path: Path
    tensors: dict[str, torch.Tensor]
    topology: dict[str, Any]
    manifest: dict[str, Any]


def write_final(run_dir: Path, state_dict: dict[str, torch.Tensor], topology: dict[str, Any],
                info: dict[str, Any]) -> Path:
    """Write ``final/`` (weights, topology, then the manifest holding their hashes and ``info``)."""
    final = run_dir / FINAL
    if final.is_symlink():  # written only inside the run, never where a link planted there points
        raise CheckpointError(Problem(str(final), "a symbolic link in place of the run's own directory: remove it"))
    final.mkdir(exist_ok=True)
    # copies: tied weights (a language model's head and embedding) share storage, which safetensors refuses
    payloads = {MODEL: save_safetensors({k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}),
                TOPOLOGY: json.dumps(topology, indent=2, sort_keys=True).encode("utf-8")}
    for name, data in payloads.items():
        replace_atomically(final / name, data)  # replaces a link in its place rather than writing through it
    manifest = {"format": FORMAT, "files": file_entries(payloads), "torch": torch.__version__, **info}
    replace_atomically(final / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
    return final


def read_final(run_dir: Path, warn: Callable[[str], None]) -> FinalModel:
    """Verify and parse ``run_dir/final``; raises :class:`CheckpointError` naming the file at fault."""
    final = run_dir / FINAL
    if not final.is_dir():
        raise CheckpointError(Problem(str(final), "missing: the run has not finished (load one of its checkpoints "
                                      "with checkpoint=..., or resume it)"))
    manifest_path = final / MANIFEST
    manifest: dict[str, Any] = {}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_bytes()[:MAX_MANIFEST_BYTES])
            files = manifest["files"]
            if manifest.get("format") != FORMAT or set(files) != {MODEL, TOPOLOGY}:
                raise ValueError("unexpected format or file list")
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(Problem(str(manifest_path), f"unreadable manifest ({exc})")) from None
        data = read_verified(final, files)
    else:
        warn(f"warning: {manifest_path} is missing (a run written before final/ had a manifest): "
             "its files cannot be verified")
        data = {}
        for name in (MODEL, TOPOLOGY):
            try:
                data[name] = (final / name).read_bytes()
            except FileNotFoundError:
                raise CheckpointError(Problem(str(final / name), "missing")) from None
    try:
        tensors = load_safetensors(data[MODEL])
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(Problem(str(final / MODEL), f"not a valid safetensors file ({exc})")) from None
    try:
        topology = json.loads(data[TOPOLOGY])
    except ValueError as exc:
        raise CheckpointError(Problem(str(final / TOPOLOGY), f"not valid JSON ({exc})")) from None
    return FinalModel(final, tensors, topology, manifest)
