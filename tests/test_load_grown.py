"""A model grown in the user's own loop, back from its checkpoint for inference or export with
``esper_core.load_grown``: a freshly built host model gets the recorded seeds (rebuilt from their IR,
no controller, optimizer or kernel store) and computes what the trained model did; ``unwrap`` and
``torch.export`` then take it out as a plain, wider network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import esper_core
from esper_core import GrowthController
from esper_core.compiler.store import LocalKernelStore
from esper_core.errors import CheckpointError
from factories import TwoLinear
from run_helpers import accuracy_on, own_loop

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module

DATA = torch.Generator().manual_seed(0)
X, Y = torch.randn(320, 8, generator=DATA), torch.randint(0, 4, (320,), generator=DATA)
EVALUATE = accuracy_on(X[:64], Y[:64])


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """40 steps of a user's loop that grows both layers (low-rank seeds folded into fc1, span seeds
    between fc1 and fc2), checkpointed with save_checkpoint; the trained model and the directory."""
    root = tmp_path_factory.mktemp("own")
    torch.manual_seed(0)
    model = TwoLinear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    growth = GrowthController(model, optimizer, example=X[:2], max_steps=40, store=LocalKernelStore(root / "kernels"),
                              evaluate=EVALUATE, seeds={"targets": ["fc1", "fc2"],
                                                        "blueprints": ["lowrank_adapter", "span_linear"],
                                                        "incubation_steps": 4, "blend_steps": 4,
                                                        "probation_steps": 4},
                              policy={"trigger": "periodic", "period_steps": 5, "growth_window": [0.0, 0.8]})
    own_loop(model, optimizer, growth, X, Y, 40, EVALUATE)
    esper_core.save_checkpoint(root / "ckpt", model=model, optimizer=optimizer, growth=growth)
    growth.close()
    kept = {e["blueprint"] for e in growth.recorder.events if e["event"] == "fossilize"}
    assert kept == {"lowrank_adapter", "span_linear"}, growth.recorder.events
    return model.eval(), root / "ckpt"


def test_a_fresh_host_model_becomes_the_grown_model_and_exports_as_a_plain_one(grown: tuple[nn.Module, Path],
                                                                              tmp_path: Path) -> None:
    trained, checkpoint = grown
    model = esper_core.load_grown(checkpoint, model=TwoLinear())
    assert not model.training and model.state_dict().keys() == trained.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(model(X), trained(X))

    plain, seeds = esper_core.unwrap(model, example=X[:64])
    assert {s.action for s in seeds} == {"merged", "widened"}
    assert isinstance(plain.fc1, nn.Linear) and plain.fc1.out_features > 16
    program = torch.export.export(plain, (X[:4],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "model.pt2")
    exported = torch.export.load(tmp_path / "model.pt2").module()
    with torch.no_grad():
        assert float((exported(X) - trained(X)).abs().max()) < 1e-5


class OtherNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.head = nn.Linear(8, 16), nn.Linear(16, 4)


def test_a_model_the_checkpoint_does_not_fit_is_one_checkpoint_error(grown: tuple[nn.Module, Path]) -> None:
    _, checkpoint = grown
    with pytest.raises(CheckpointError, match="its seeds grow on layers this model cannot wrap"):
        esper_core.load_grown(checkpoint, model=OtherNet())


def test_the_own_loop_s_checkpoint_calls_name_an_argument_of_the_wrong_type(tmp_path: Path) -> None:
    """``save_checkpoint(..., optimizer=None)`` failed with ``'NoneType' object has no attribute
    'param_groups'`` from inside Esper's optimizer code, ``growth=None`` and ``load_grown(model=None)``
    likewise, and ``unwrap("model")`` with ``'str' object has no attribute 'named_modules'``."""
    model = TwoLinear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    growth = GrowthController(model, optimizer, example=X[:2], max_steps=10, store=LocalKernelStore(tmp_path / "k"),
                              start=False, seeds={"targets": ["fc1"]})
    parts = {"model": model, "optimizer": optimizer, "growth": growth}
    for call in (esper_core.save_checkpoint, esper_core.load_checkpoint):
        for name, wrong in (("model", None), ("optimizer", None), ("growth", None), ("optimizer", [optimizer])):
            with pytest.raises(TypeError, match=rf"{call.__name__}\({name}=\.\.\.\): .*not (NoneType|list)"):
                call(tmp_path / "own", **{**parts, name: wrong})
    assert not (tmp_path / "own").exists()
    with pytest.raises(TypeError, match=r"load_grown\(model=\.\.\.\): .*not NoneType"):
        esper_core.load_grown(tmp_path / "own", model=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"unwrap\(model\): .*not str"):
        esper_core.unwrap("model")  # type: ignore[arg-type]
