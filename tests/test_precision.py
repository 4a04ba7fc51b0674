"""Mixed precision (``trainer.precision``): an fp16 loss scale must not change what an incubating seed
learns (its proximal pull is scaled with the gradient it joins), the scaler's state must survive a
checkpoint, and a bf16 run must grow and finish like an fp32 one. On the CPU: autocast and GradScaler
run there too, so CI exercises the same code paths a GPU run takes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from esper_core import wrap
from esper_core.blueprints.library import BlueprintLibrary
from esper_core.compiler.kernels import KernelSpec, build_kernel
from esper_core.seeds.manager import SlotRef
from esper_core.training import run_state
from esper_core.training.precision import Precision
from esper_core.training.trainer import Trainer
from run_helpers import copy_at

RECIPE = """\
run: {name: mixed, seed: 0, device: cpu}
data: {source: digits, layout: flat, batch_size: 32}
model: {arch: mlp, widths: [16]}
seeds: {targets: ["type:Linear"], exclude: [head], blueprints: [wide_mlp], rank: 4,
        incubation_steps: 20, blend_steps: 20, probation_steps: 10, fossilize_margin: -1.0}
policy: {trigger: periodic, period_steps: 30, growth_window: [0.05, 0.5], max_seeds: 2}
trainer: {max_steps: 120, lr: 0.01, eval_every: 10, log_every: 10}
checkpoint: {every_steps: 40, keep: 5}
telemetry: {progress: none}
"""


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


def test_the_fp16_loss_scale_does_not_change_what_an_incubating_seed_learns() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    models, grads = [plain, copy.deepcopy(plain)], []
    x = torch.randn(8, 6)
    target = torch.randn(8, 3)
    for model, scaled in zip(models, (False, True)):
        manager = wrap(model, targets=["2"])
        torch.manual_seed(1)
        seed, _ = build_kernel(KernelSpec(BlueprintLibrary.discover().get("wide_mlp").blueprint,
                                          manager.layers["2"].spec, 4))
        ref = SlotRef("2", 0)
        manager.germinate(ref, "wide_mlp", "test", 0)
        manager.start_incubation(ref, seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        precision = Precision("fp16" if scaled else "fp32", torch.device("cpu"))
        manager.layers["2"].grad_scaler = precision.scaler  # what the growth controller does with its scaler
        precision.backward(F.mse_loss(model(x), target))  # the scaler's first step: the scale is made in it
        precision.unscale(optimizer)
        grads.append([p.grad.clone() for p in manager.seed_parameters(ref)])
    assert precision.scaler.get_scale() > 1.0  # the loss really was scaled
    for fp32, fp16 in zip(*grads):
        torch.testing.assert_close(fp16, fp32, rtol=1e-5, atol=1e-7)


def _fit(tmp_path: Path, *overrides: str) -> tuple[Trainer, dict]:
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(RECIPE, encoding="utf-8")
    trainer = Trainer.from_recipe(recipe, [f"run.output_dir={tmp_path / 'runs'}", *overrides])
    return trainer, trainer.fit()


def test_a_bf16_run_grows_and_learns(tmp_path: Path) -> None:
    _, summary = _fit(tmp_path, "trainer.precision=bf16")
    assert summary["seeds"]["fossilized"] >= 1
    assert summary["test_accuracy"] > 0.8  # ten digit classes: chance is 0.1


def test_an_fp16_run_resumes_bit_exactly_with_its_loss_scale(tmp_path: Path) -> None:
    whole, summary = _fit(tmp_path, "trainer.precision=fp16")
    run_dir = Path(summary["run_dir"])
    copy_dir = copy_at(run_dir, tmp_path / "copy", 40)
    resumed = Trainer.resume(copy_dir, ["telemetry.progress=none"])
    assert resumed.precision.scaler.is_enabled()
    resumed.fit()
    assert resumed.precision.scaler.get_scale() == whole.precision.scaler.get_scale()
    a = load_file(str(run_dir / "final" / "model.safetensors"))
    b = load_file(str(copy_dir / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_loss_scale_is_part_of_the_run_state(tmp_path: Path) -> None:
    """A rollback or resume restores the scale the run had reached (a backed-off scale must not jump
    back to 65536 and overflow again)."""
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(RECIPE, encoding="utf-8")
    overrides = [f"run.output_dir={tmp_path / 'runs'}", "trainer.precision=fp16"]
    first = Trainer.from_recipe(recipe, overrides)
    first.precision.scaler.scale(torch.ones(()))  # the scaler creates its scale lazily, on first use
    first.precision.scaler.update(new_scale=1024.0)
    state = run_state.capture(first, checkpoint=False)
    second = Trainer.from_recipe(recipe, overrides)
    run_state.restore(second, state)
    assert second.precision.scaler.get_scale() == 1024.0
