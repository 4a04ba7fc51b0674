"""The CPU copy of a run's state from a GPU (the governor's snapshots, the best model, checkpoints):
copies are queued without waiting and awaited once, and every copy is exact,
independent of the training that continues, and shaped as its source. Skipped where there is no CUDA
device (CI); run on the GPU machine with ``python -m pytest tests/test_cuda_snapshot.py``."""

from __future__ import annotations

import pytest
import torch

from esper_core.growth.state import cpu_copy, join, split

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _tree() -> dict:
    cuda = torch.device("cuda")
    wide = torch.randn(8, 6, device=cuda)
    return {"model": {"w": torch.randn(300, 1000, device=cuda),  # 1.2 MB
                      "b": torch.randn(7, device=cuda), "t": wide.t(),  # not contiguous
                      "half": torch.randn(3, 5, device=cuda, dtype=torch.bfloat16),
                      "count": torch.tensor(12, device=cuda), "mask": torch.rand(9, device=cuda) > 0.5,
                      "empty": torch.zeros(0, 4, device=cuda)},
            "optimizer": [torch.randn(4, 4, device=cuda) for _ in range(50)] + [torch.tensor(3.0)],
            "steps": (1, "two", None, torch.arange(5, device=cuda))}


def _same(copy: object, source: object) -> None:
    if isinstance(source, torch.Tensor):
        assert isinstance(copy, torch.Tensor) and copy.device.type == "cpu"
        assert copy.dtype == source.dtype and copy.shape == source.shape
        assert torch.equal(copy, source.cpu())
    elif isinstance(source, dict):
        assert isinstance(copy, dict) and copy.keys() == source.keys()
        for key in source:
            _same(copy[key], source[key])
    elif isinstance(source, (list, tuple)):
        assert isinstance(copy, list) and len(copy) == len(source)
        for a, b in zip(copy, source):
            _same(a, b)
    else:
        assert copy == source


def test_a_copy_from_the_gpu_is_exact_and_stays_as_it_was() -> None:
    tree = _tree()
    copy = cpu_copy(tree)
    _same(copy, tree)
    frozen = [t.clone() for t in copy["optimizer"][:50]]
    for tensor in tree["optimizer"][:50]:  # training goes on in place after the snapshot
        tensor.add_(1.0)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(copy["optimizer"][:50], frozen))


def test_a_checkpoint_split_of_gpu_state_joins_back_to_the_same_values() -> None:
    tree = _tree()
    tensors, skeleton = split(tree)
    assert all(t.device.type == "cpu" for t in tensors.values())
    _same(join(tensors, skeleton), tree)
