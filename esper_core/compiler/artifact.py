"""The kernel artifact: a manifest, initial weights and an exported program, verifiable byte for byte.

Files (the same whether they live in a directory, a Redis hash or a database row):

- ``manifest.json``: address, canonical IR, target, validation and characterisation results,
  versions, and the sha256 and size of every other file;
- ``manifest.sha256``: the sha256 of ``manifest.json``, so the manifest is verified before it is parsed;
- ``weights.safetensors``: initial weights (no code, no pickle);
- ``program.pt2``: the ``torch.export`` program, for deployment and audit; training never loads it.

:meth:`Kernel.from_files` verifies everything before a :class:`Kernel` exists, so holding one means
its bytes are the ones the compiler wrote. :meth:`Kernel.instantiate` is the training path: rebuild
the module from the IR with Esper's builder, then load the safetensors weights.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import safetensors
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from esper_core.blueprints.builder import build
from esper_core.compiler.checks import Check
from esper_core.compiler.kernels import KernelSpec, address_of
from esper_core.safe_read import parse_json

FORMAT = 1
MANIFEST = "manifest.json"
DIGEST = "manifest.sha256"
WEIGHTS = "weights.safetensors"
PROGRAM = "program.pt2"
FILES = (MANIFEST, DIGEST, WEIGHTS, PROGRAM)
MAX_MANIFEST_BYTES = 16 << 20
"""Largest kernel manifest parsed (Esper's are a few KB: the IR and the check results)."""
_ADDRESS = re.compile(r"^[0-9a-f]{64}$")


class CorruptKernel(ValueError):
    """Stored bytes that fail verification; a store treats the entry as a miss and quarantines it."""


def is_address(text: str) -> bool:
    return bool(_ADDRESS.match(text))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Kernel:
    """A verified kernel artifact held in memory (a few tens of kilobytes for the builtin blueprints)."""

    address: str
    manifest: dict[str, Any]
    files: Mapping[str, bytes]

    @classmethod
    def package(cls, spec: KernelSpec, module: nn.Module, program: bytes, checks: list[Check],
                characterisation: dict[str, Any]) -> Kernel:
        """Assemble the artifact of a validated ``module`` (the kernel at init)."""
        address = spec.address()
        weights = save_safetensors({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                                   metadata={"address": address})
        manifest = {
            "format": FORMAT,
            "address": address,
            "blueprint": {"name": spec.blueprint.name, "version": spec.blueprint.version,
                          "digest": spec.blueprint.digest()},
            **spec.to_json(),
            "validation": {check.name: check.to_json() for check in checks},
            "characterisation": characterisation,
            "versions": {"torch": torch.__version__, "safetensors": safetensors.__version__,
                         "python": platform.python_version()},
            "files": {name: {"sha256": sha256(data), "bytes": len(data)}
                      for name, data in ((WEIGHTS, weights), (PROGRAM, program))},
        }
        text = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        return cls(address, json.loads(text), {MANIFEST: text, DIGEST: (sha256(text) + "\n").encode(),
                                       WEIGHTS: weights, PROGRAM: program})

    @classmethod
    def from_files(cls, address: str, files: Mapping[str, bytes]) -> Kernel:
        """Verify stored bytes and return the kernel; raises :class:`CorruptKernel` on any mismatch."""
        missing = [name for name in FILES if name not in files]
        if missing:
            raise CorruptKernel(f"missing {', '.join(missing)}")
        text = files[MANIFEST]
        if files[DIGEST].strip().decode("ascii", "replace") != sha256(text):
            raise CorruptKernel(f"{MANIFEST} does not match {DIGEST}")
        try:
            manifest = parse_json(text, MAX_MANIFEST_BYTES)  # bounded: a shared tier's bytes are anyone's
            _check_manifest(manifest, address, files)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptKernel(f"{MANIFEST}: {exc}") from None
        return cls(address, manifest, dict(files))

    @property
    def spec(self) -> KernelSpec:
        return KernelSpec.from_json(self.manifest)

    def instantiate(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
        """A fresh trainable module: built from the IR on the meta device (no RNG drawn, nothing
        allocated twice), materialised on ``device`` and filled with the stored weights."""
        spec = self.spec
        with torch.device("meta"):
            module = build(spec.resolve())
        module = module.to_empty(device=device).to(dtype=dtype or spec.torch_dtype)
        module.load_state_dict(load_safetensors(self.files[WEIGHTS]), strict=True)
        return module


def _check_manifest(manifest: dict[str, Any], address: str, files: Mapping[str, bytes]) -> None:
    """Raise ``ValueError`` unless the manifest is for ``address`` and every file matches its digest."""
    if manifest["format"] != FORMAT or manifest["address"] != address:
        raise ValueError(f"describes {manifest['address']!r} (format {manifest['format']!r}), not {address!r}")
    if address_of(manifest, manifest["versions"]["torch"]) != address:
        raise ValueError("the address does not match the manifest's IR, target and torch version")
    if set(manifest["files"]) != {WEIGHTS, PROGRAM}:
        raise ValueError(f"lists files {sorted(manifest['files'])}")
    for name, entry in manifest["files"].items():
        if sha256(files[name]) != entry["sha256"]:
            raise ValueError(f"{name} does not match its recorded sha256")
