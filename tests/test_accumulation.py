"""Gradient accumulation (``trainer.accumulate_steps``): k micro-batches per optimizer step give the step
one batch k times larger would give (the model has no batch-dependent layer), an incubating seed still
leaves the host's update untouched, and micro-batches split every kind of collated batch in order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from esper_core.seeds.lifecycle import SeedState
from esper_core.training.accumulation import micro_batches
from esper_core.training.trainer import Trainer
from run_helpers import copy_at

RECIPE = """\
run: {name: acc, seed: 3, device: cpu}
data: {source: digits, layout: flat, batch_size: 16}
model: {arch: mlp, widths: [32, 16]}
seeds: {targets: ["type:Linear"], exclude: [head], blueprints: [wide_mlp], rank: 4, incubation_steps: 1000}
policy: {trigger: periodic, period_steps: 10, growth_window: [0.05, 0.9], max_seeds: 2}
trainer: {max_steps: 40, lr: 0.01, eval_every: 10, log_every: 10}
telemetry: {progress: none}
"""
"""Forty steps stay inside the first epoch of the big-batch run too (1257 training samples); the
incubation outlasts the run, so every seed that germinates is incubating at the end."""


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


def _fit(tmp_path: Path, name: str, *overrides: str) -> Trainer:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE, encoding="utf-8")
    trainer = Trainer.from_recipe(recipe, [f"run.output_dir={tmp_path / name}", *overrides])
    trainer.fit()
    return trainer


def test_four_micro_batches_step_like_one_batch_four_times_larger(tmp_path: Path) -> None:
    micro = _fit(tmp_path, "micro", "trainer.accumulate_steps=4", "policy.max_seeds=0")
    large = _fit(tmp_path, "large", "data.batch_size=64", "policy.max_seeds=0")
    single = _fit(tmp_path, "single", "policy.max_seeds=0")  # what a missing average would resemble
    a, b = micro.model.state_dict(), large.model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert micro.step == large.step == 40 and micro.sampler.position() == large.sampler.position()
    far = max((single.model.state_dict()[k] - b[k]).abs().max().item() for k in b)
    assert far > 1e-2  # the comparison can tell: a 16-sample run ends elsewhere


def test_an_incubating_seed_leaves_the_host_untouched_across_micro_batches(tmp_path: Path) -> None:
    grown = _fit(tmp_path, "grown", "trainer.accumulate_steps=2")
    plain = _fit(tmp_path, "plain", "trainer.accumulate_steps=2", "policy.max_seeds=0")
    states = [layer.slots[i].state for layer in grown.manager.layers.values() for i in range(len(layer.slots))]
    assert SeedState.TRAINING in states
    host = {k: v for k, v in grown.model.state_dict().items() if ".seeds." not in k and not k.endswith("alpha")}
    reference = plain.model.state_dict()
    for key, value in host.items():
        assert torch.equal(value, reference[key]), f"{key}: the incubating seed changed the host"


def test_micro_batches_split_tensors_tuples_dicts_and_per_sample_lists_in_order() -> None:
    batch = {"input_ids": torch.arange(12).reshape(6, 2), "labels": torch.arange(6), "ids": list("abcdef")}
    parts = micro_batches(batch, 3)
    assert [p["labels"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert [p["ids"] for p in parts] == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    x, y = torch.randn(8, 3), torch.arange(8)
    pairs = micro_batches((x, y), 2)
    assert all(isinstance(p, tuple) for p in pairs) and torch.equal(pairs[1][0], x[4:])


def test_an_accumulating_growing_run_resumes_bit_exactly(tmp_path: Path) -> None:
    overrides = ["trainer.accumulate_steps=3", "trainer.schedule=one_cycle", "trainer.max_steps=60",
                 "seeds.incubation_steps=10", "seeds.blend_steps=10", "seeds.probation_steps=5",
                 "seeds.fossilize_margin=-1.0", "checkpoint.every_steps=20"]
    whole = _fit(tmp_path, "whole", *overrides)
    assert whole.run_dir is not None and whole.manager.counts()["fossilized"] >= 1
    copy = copy_at(whole.run_dir, tmp_path / "copy", 20)
    state = load_file(str(copy / "checkpoints" / "step-00000020" / "tensors.safetensors"))
    assert any(".seeds." in key for key in state), "a seed must be alive at the checkpoint"
    Trainer.resume(copy).fit()
    assert (copy / "final/model.safetensors").read_bytes() == (whole.run_dir / "final/model.safetensors").read_bytes()
