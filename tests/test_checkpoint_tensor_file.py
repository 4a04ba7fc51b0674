"""The checkpoint's own safetensors writer: the exact bytes the library writes, the sha256 of those
bytes computed while writing, and a clear refusal of tensors the format cannot hold."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

from esper_core.checkpoints.tensor_file import _CHUNK, _GATHER_BELOW, write_tensors


def _mixed() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    wide = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    return {
        "model/w": torch.randn(64, 32, generator=generator),
        "model/w_t": torch.randn(32, 64, generator=generator).t(),  # not contiguous
        "model/b": torch.randn(32, generator=generator),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "double": wide[:, 1:4],  # a view with a storage offset
        "steps": torch.arange(7),
        "i32": torch.arange(5, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16),
        "i8": torch.arange(-2, 2, dtype=torch.int8),
        "half": torch.randn(9, generator=generator).half(),
        "bf16": torch.randn(9, generator=generator).bfloat16(),
        "rng/torch": torch.get_rng_state(),
        "mask": torch.tensor([True, False, True]),
        "big": torch.randn(_CHUNK // 4 + 123, generator=generator),  # spans two write chunks
        "medium": torch.randn(_GATHER_BELOW // 4, generator=generator),  # written on its own
    }


def test_the_file_is_the_librarys_byte_for_byte_and_its_digest_is_the_sha256_of_it(tmp_path: Path) -> None:
    tensors = _mixed()
    with open(tmp_path / "t.safetensors", "wb") as handle:
        entry = write_tensors(handle, tensors)
    written = (tmp_path / "t.safetensors").read_bytes()
    assert written == save({k: v.contiguous() for k, v in tensors.items()})
    assert entry == {"sha256": hashlib.sha256(written).hexdigest(), "bytes": len(written)}
    loaded = load(written)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_an_empty_set_of_tensors_is_a_valid_file(tmp_path: Path) -> None:
    with open(tmp_path / "t.safetensors", "wb") as handle:
        write_tensors(handle, {})
    assert (tmp_path / "t.safetensors").read_bytes() == save({})


@pytest.mark.parametrize(("tensor", "reason"), [
    (torch.zeros(3, device="meta"), "not the CPU"),
    (torch.zeros(2, dtype=torch.complex64), "safetensors cannot store"),
])
def test_a_tensor_the_file_cannot_hold_is_refused_by_name(tmp_path: Path, tensor: torch.Tensor, reason: str) -> None:
    with open(tmp_path / "t.safetensors", "wb") as handle, pytest.raises(ValueError, match=f"'odd'.*{reason}"):
        write_tensors(handle, {"fine": torch.ones(2), "odd": tensor})
