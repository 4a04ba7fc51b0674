"""A run's ``final/`` directory: the trained model's weights and seed topology, with a manifest.

``final/model.safetensors`` holds the model's state dict (Kasmina key names: ``layers.0.host.weight``,
``layers.0.seeds.1.0.weight``, ``layers.0.alpha``), ``final/topology.json`` the seed topology
(:meth:`SeedManager.topology`: per slot its state and, for seeds, the blueprint IR and target they
are rebuilt from), and ``final/manifest.json`` the sha256 and size of both plus what rebuilding the
host model needs besides the recipe (the per-sample input shape and the number of outputs, so the
data need not be read again). The manifest is written last and atomically: a ``final/`` without one
was never finished, or was written by an Esper older than the manifest (it loads with a warning, but
only when the run's chained ``run_end`` event, which has recorded the manifest's sha256 since, shows
that the run predates it).
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

from esper_core.checkpoints.store import MAX_FILE_BYTES, file_entries, read_verified
from esper_core.durable import replace_atomically
from esper_core.errors import CheckpointError, Problem
from esper_core.safe_read import UnsafeInput, foreign, parse_json, read_regular
from esper_core.telemetry.events import AuditError, RunDirError, RunDirEvents

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
    kind = foreign(final, directory=True)  # written only inside the run, never where a link planted there points
    if kind is not None:  # (a file swapped in while the run trained would be a FileExistsError traceback)
        raise CheckpointError(Problem(str(final), f"{kind} in place of the run's own directory: remove it"))
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
    raw = _read(manifest_path, MAX_MANIFEST_BYTES, missing_ok=True)
    if raw is not None:
        try:
            manifest = parse_json(raw, MAX_MANIFEST_BYTES)
            files = manifest["files"]
            if manifest.get("format") != FORMAT or set(files) != {MODEL, TOPOLOGY}:
                raise ValueError("unexpected format or file list")
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(Problem(str(manifest_path), f"unreadable manifest ({exc})")) from None
        data = read_verified(final, files)
    else:
        _check_predates_manifests(run_dir, manifest_path)
        warn(f"warning: {manifest_path} is missing (a run written before final/ had a manifest): "
             "its files cannot be verified")
        data = {name: _read(final / name, MAX_FILE_BYTES) for name in (MODEL, TOPOLOGY)}
    try:
        tensors = load_safetensors(data[MODEL])
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(Problem(str(final / MODEL), f"not a valid safetensors file ({exc})")) from None
    try:
        topology = json.loads(data[TOPOLOGY])
    except ValueError as exc:
        raise CheckpointError(Problem(str(final / TOPOLOGY), f"not valid JSON ({exc})")) from None
    return FinalModel(final, tensors, topology, manifest)


def _read(path: Path, limit: int, missing_ok: bool = False) -> bytes | None:
    """The bytes of a regular file of ``final/`` (never through a link, never a FIFO that would hang);
    ``None`` for a missing one where ``missing_ok``, else a located :class:`CheckpointError`."""
    try:
        return read_regular(path, limit)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise CheckpointError(Problem(str(path), "missing")) from None
    except UnsafeInput as exc:
        raise CheckpointError(Problem(str(path), str(exc))) from None


def _check_predates_manifests(run_dir: Path, manifest_path: Path) -> None:
    """A ``final/`` without a manifest loads unverified only for a run written before manifests existed.
    Since then, the chained ``run_end`` event records the manifest's sha256 (``binding.ARTIFACTS``), so a run
    whose ``run_end`` does is damaged or tampered with (its weights could be anything): refused, exit 3.
    So is one whose event log, which says which of the two it is, cannot be read."""
    bound = f"{FINAL}/{MANIFEST}"
    try:
        source = RunDirEvents(run_dir)
        ends = [(event.where, record) for event in source.stored()
                if isinstance(record := event.parse(), dict) and record.get("event") == "run_end"]
    except (RunDirError, AuditError, OSError) as exc:
        raise CheckpointError(Problem(str(manifest_path), f"missing, and the run's event log, which says whether "
                                      f"the run predates manifests, cannot be read ({exc})")) from None
    if ends and isinstance(ends[-1][1].get("artifacts"), dict) and bound in ends[-1][1]["artifacts"]:
        raise CheckpointError(Problem(str(manifest_path), f"missing, but the run's run_end event "
                                      f"({source.name}:{ends[-1][0]}) records its sha256: the run was written "
                                      "with one, so final/ was damaged or tampered with; restore it, or load one of "
                                      "the run's checkpoints (checkpoint=...)"))
