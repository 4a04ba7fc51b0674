"""store.save: every file it commits verifies, and a save that fails part-way changes nothing a
reader sees (the syncs run on worker threads; their failures must still fail the save)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esper_core.checkpoints import store


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"model/w": torch.randn(64, 32), "model/b": torch.randn(32), "rng/torch": torch.get_rng_state()}


def test_a_saved_checkpoint_loads_back_identically_and_latest_names_it(tmp_path: Path) -> None:
    tensors, state = _tensors(), {"step": 7, "nested": {"a": [1, 2.5, None]}}
    path = store.save(tmp_path, 7, tensors, state, {"recipe_sha256": "r"})
    loaded = store.load(path)
    assert loaded.state == state and loaded.manifest["recipe_sha256"] == "r"
    assert loaded.tensors.keys() == tensors.keys()
    assert all(torch.equal(loaded.tensors[k], v) for k, v in tensors.items())
    assert (tmp_path / store.LATEST).read_text() == store.checkpoint_name(7) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [store.LATEST, store.checkpoint_name(7)]


@pytest.mark.parametrize("failing", [store.TENSORS, store.MANIFEST])
def test_a_failed_fsync_fails_the_save_and_leaves_the_previous_checkpoint_current(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    store.save(tmp_path, 1, _tensors(), {"step": 1}, {})
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        if os.readlink(f"/proc/self/fd/{descriptor}").endswith(failing):
            raise OSError(5, "Input/output error")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        store.save(tmp_path, 2, _tensors(), {"step": 2}, {})
    monkeypatch.undo()
    assert (tmp_path / store.LATEST).read_text() == store.checkpoint_name(1) + "\n"
    assert not (tmp_path / store.checkpoint_name(2)).exists()
    assert not list(tmp_path.glob(f".{store.LATEST}-*"))  # the pointer's temporary file is gone
    assert [p.name for p in store.remove_leftovers(tmp_path)] == [f".tmp-{store.checkpoint_name(2)}-{os.getpid()}"]
    assert store.load(tmp_path / store.checkpoint_name(1)).state == {"step": 1}


def test_a_write_that_fails_part_way_fails_the_save_and_leaves_the_previous_checkpoint_current(tmp_path: Path) -> None:
    """A full disk, as the kernel reports it (EFBIG past a file-size limit), in a child process so
    the limit touches nothing else: the tensors' writer stops part-way through the file."""
    script = f"""
import resource, signal, sys, torch
from pathlib import Path
from esper_core.checkpoints import store
directory = Path({str(tmp_path)!r})
store.save(directory, 1, {{"w": torch.ones(8)}}, {{"step": 1}}, {{}})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
try:
    store.save(directory, 2, {{"w": torch.ones(1 << 20)}}, {{"step": 2}}, {{}})
except OSError as exc:
    print("failed:", exc.errno)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "failed: 27"  # EFBIG
    assert (tmp_path / store.LATEST).read_text() == store.checkpoint_name(1) + "\n"
    assert not (tmp_path / store.checkpoint_name(2)).exists()
    leftovers = sorted(p.name for p in tmp_path.glob(".tmp-*"))
    assert len(leftovers) == 1 and sorted(p.name for p in store.remove_leftovers(tmp_path)) == leftovers
    assert store.load(tmp_path / store.checkpoint_name(1)).state == {"step": 1}
