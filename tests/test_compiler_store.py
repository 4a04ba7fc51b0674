"""The kernel artifact and the local store: verification, write-once, atomicity, quarantine, round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from esper_core.blueprints.host import HostSpec
from esper_core.blueprints.library import BUILTIN_DIR, load_blueprint
from esper_core.compiler.artifact import DIGEST, MANIFEST, PROGRAM, WEIGHTS, CorruptKernel, Kernel
from esper_core.compiler.kernels import KernelSpec
from esper_core.compiler.pipeline import compile_kernel
from esper_core.compiler.store import LocalKernelStore

CONV = HostSpec("conv2d", 4, 8, (3, 3), (2, 2), (1, 1))


@pytest.fixture(scope="module")
def kernel() -> Kernel:
    blueprint = load_blueprint(BUILTIN_DIR / "residual_conv.yaml").blueprint
    return compile_kernel(KernelSpec(blueprint, CONV, 4))


def test_manifest_records_everything(kernel: Kernel) -> None:
    manifest = kernel.manifest
    assert manifest["address"] == kernel.address == kernel.spec.address()
    assert manifest["ir"]["name"] == "residual_conv" and manifest["target"]["output_shape"] == [8, 4, 4]
    assert manifest["versions"]["torch"] == torch.__version__
    assert set(manifest["validation"]) >= {"output_shape", "finite", "gradient_flow", "germination", "export",
                                           "zero_at_init", "params"}
    figures = manifest["characterisation"]
    assert figures["params"] == sum(p.numel() for p in kernel.instantiate().parameters())
    assert figures["flops_forward"] > 0 and figures["flops_backward"] > 0 and figures["latency_ms"] > 0
    assert json.loads(kernel.files[MANIFEST]) == manifest


def test_every_modified_byte_is_detected(kernel: Kernel) -> None:
    for name in (MANIFEST, DIGEST, WEIGHTS, PROGRAM):
        data = bytearray(kernel.files[name])
        data[len(data) // 2] ^= 0x01
        with pytest.raises(CorruptKernel):
            Kernel.from_files(kernel.address, {**kernel.files, name: bytes(data)})
    with pytest.raises(CorruptKernel, match="describes"):
        Kernel.from_files("0" * 64, kernel.files)
    assert Kernel.from_files(kernel.address, kernel.files).manifest == kernel.manifest


def test_instantiate_rebuilds_from_the_ir_without_touching_the_rng(kernel: Kernel) -> None:
    state = torch.random.get_rng_state()
    module = kernel.instantiate("cpu", torch.float64)
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(p.dtype == torch.float64 and p.requires_grad for p in module.parameters())
    again = kernel.instantiate()
    assert all(torch.equal(a.double(), b) for a, b in zip(again.state_dict().values(), module.state_dict().values()))


def test_store_is_write_once_and_iterable(tmp_path: Path, kernel: Kernel) -> None:
    store = LocalKernelStore(tmp_path / "kernels")
    assert kernel.address not in store and store.get(kernel.address) is None and list(store) == []
    store.put(kernel)
    entry = store.path_for(kernel.address)
    written = {name: (entry / name).stat().st_mtime_ns for name in os.listdir(entry)}
    store.put(kernel)  # a second put of a valid entry writes nothing
    assert {name: (entry / name).stat().st_mtime_ns for name in os.listdir(entry)} == written
    assert kernel.address in store and list(store) == [kernel.address]
    assert store.get(kernel.address).manifest == kernel.manifest
    assert not any((tmp_path / "kernels" / ".tmp").iterdir())  # no staging directory left behind
    with pytest.raises(ValueError):
        store.path_for("../../etc")


def test_a_half_written_entry_is_never_visible(tmp_path: Path, kernel: Kernel, monkeypatch) -> None:
    store = LocalKernelStore(tmp_path)
    monkeypatch.setattr(os, "rename", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        store.put(kernel)
    monkeypatch.undo()
    assert kernel.address not in store and store.get(kernel.address) is None
    assert not any((tmp_path / ".tmp").iterdir())


def test_a_corrupt_entry_is_a_miss_quarantined_and_replaced(tmp_path: Path, kernel: Kernel) -> None:
    store = LocalKernelStore(tmp_path)
    store.put(kernel)
    weights = store.path_for(kernel.address) / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert store.get(kernel.address) is None
    assert store.stats.corrupt == 1 and kernel.address not in store
    (quarantined,) = (tmp_path / "quarantine").iterdir()
    assert "weights.safetensors" in (quarantined / "REASON").read_text()
    store.put(kernel)
    assert store.get(kernel.address) is not None


ROUND_TRIP = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    from esper_core.compiler.store import LocalKernelStore
    root, address, inputs, outputs = sys.argv[1:]
    store = LocalKernelStore(root)
    kernel = store.get(address)                 # verified by hash, or None
    assert kernel is not None and store.stats.hits == 1
    module = kernel.instantiate("cpu")
    save_file(train(module, **load_file(inputs)), outputs)
""")

TRAIN = textwrap.dedent("""
    def train(module, x, r):
        \"\"\"Outputs at init, then three SGD steps on <g(x), r>: every parameter must move.\"\"\"
        import torch
        result = {"init": module(x).detach()}
        before = [p.detach().clone() for p in module.parameters()]
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            (module(x) * r).sum().backward()
            optimizer.step()
        assert all(not torch.equal(p, b) for p, b in zip(module.parameters(), before))
        result["trained"] = module(x).detach()
        return result
""")
exec(TRAIN)


def test_round_trip_through_the_store_in_a_new_process(tmp_path: Path, kernel: Kernel) -> None:
    store = LocalKernelStore(tmp_path / "kernels")
    store.put(kernel)
    x, r = torch.randn(3, 4, 8, 8), torch.randn(3, 8, 4, 4)
    save_file({"x": x, "r": r}, tmp_path / "inputs.safetensors")
    script = tmp_path / "child.py"
    script.write_text(TRAIN + ROUND_TRIP)
    result = subprocess.run([sys.executable, str(script), str(store.root), kernel.address,
                             str(tmp_path / "inputs.safetensors"), str(tmp_path / "outputs.safetensors")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    child = load_file(tmp_path / "outputs.safetensors")
    local = train(kernel.instantiate(), x, r)  # noqa: F821 (defined by exec(TRAIN) above)
    assert torch.equal(child["init"], local["init"]) and torch.equal(child["trained"], local["trained"])
    assert torch.count_nonzero(local["trained"])


def test_a_recompiled_kernel_has_the_same_weights(kernel: Kernel) -> None:
    again = compile_kernel(kernel.spec)
    assert again.address == kernel.address and again.files[WEIGHTS] == kernel.files[WEIGHTS]
