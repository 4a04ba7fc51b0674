"""CompileService: store hits without the worker, misses in a spawned worker process, merged
duplicates, failures that mark a kernel unusable without raising, prefetch, corrupt entries recompiled.

One service (one worker process) is shared by the module: starting a spawned worker costs seconds.
"""

from __future__ import annotations

from concurrent.futures import wait
from pathlib import Path

import pytest

from esper_core.blueprints.host import HostSpec
from esper_core.blueprints.ir import Blueprint
from esper_core.blueprints.library import BUILTIN_DIR, load_blueprint
from esper_core.compiler.artifact import WEIGHTS
from esper_core.compiler.kernels import KernelSpec
from esper_core.compiler.service import CompileService, KernelUnavailable
from esper_core.compiler.store import LocalKernelStore

TIMEOUT = 120
ADAPTER = load_blueprint(BUILTIN_DIR / "lowrank_adapter.yaml").blueprint
DEAD = Blueprint.model_validate({"name": "dead", "host": "linear", "ops": [
    {"op": "linear", "in": "in", "out": "rank", "bias": False, "init": "zeros"},
    {"op": "linear", "in": "rank", "out": "out", "bias": False, "init": "zeros"}]})


def spec(width: int, blueprint: Blueprint = ADAPTER) -> KernelSpec:
    return KernelSpec(blueprint, HostSpec("linear", width, width), 2)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    store = LocalKernelStore(tmp_path_factory.mktemp("kernels"))
    with CompileService(store, workers=1) as running:
        yield running


def test_a_miss_compiles_in_the_worker_and_lands_in_the_store(service: CompileService) -> None:
    future = service.request(spec(5))
    kernel = future.result(TIMEOUT)
    assert kernel.address == spec(5).address() and kernel.address in service.store
    assert kernel.manifest["validation"]["export"]["passed"]
    hit = service.request(spec(5))
    assert hit.done() and hit.result().manifest == kernel.manifest  # served by the store, no worker
    assert service.stats.hits >= 1 and service.stats.compiled >= 1


def test_duplicate_requests_share_one_compile(service: CompileService) -> None:
    first, second = service.request(spec(6)), service.request(spec(6))
    assert first is second
    assert first.result(TIMEOUT).address == spec(6).address()


def test_a_failing_compile_marks_the_kernel_unusable_without_raising(service: CompileService) -> None:
    future = service.request(spec(7, DEAD))
    error = future.exception(TIMEOUT)
    assert isinstance(error, KernelUnavailable)
    (problem,) = error.problems
    assert problem.field == "ops.0" and "gradient_flow" in problem.message and "never receive" in problem.message
    again = service.request(spec(7, DEAD))
    assert again.done() and again.exception() is error
    assert spec(7, DEAD).address() in service.unusable


def test_an_absurd_request_fails_cleanly(service: CompileService) -> None:
    error = service.request(KernelSpec(ADAPTER, HostSpec("linear", 8, 8), 2**40)).exception(TIMEOUT)
    assert isinstance(error, KernelUnavailable) and "outside 1..1048576" in str(error)


def test_prefetch_compiles_every_spec(service: CompileService) -> None:
    futures = service.prefetch([spec(9), spec(10), spec(9)])
    _, not_done = wait(futures, timeout=TIMEOUT)
    assert not not_done and futures[0] is futures[2]
    assert {f.result().address for f in futures} == {spec(9).address(), spec(10).address()}


def test_a_corrupt_store_entry_is_recompiled_identically(service: CompileService) -> None:
    original = service.request(spec(11)).result(TIMEOUT)
    weights: Path = service.store.path_for(original.address) / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    compiled = service.stats.compiled
    rebuilt = service.request(spec(11)).result(TIMEOUT)
    assert service.stats.compiled == compiled + 1  # a miss: compiled again by the worker
    assert rebuilt.files[WEIGHTS] == original.files[WEIGHTS]  # weights are seeded from the address
    assert service.store.get(original.address) is not None
    assert service.store.stats.corrupt >= 1
