"""Determinism on the GPU: with ``run.deterministic: true`` a CUDA run resumed from a mid-run
checkpoint ends byte-identical to the uninterrupted run, in fp32 and bf16 and under ``torch.compile``,
with a seed grown after the checkpoint. Skipped where there is no CUDA device (CI); run on the GPU machine with
``python -m pytest tests/test_cuda_resume.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from esper_core.training.trainer import Trainer
from run_helpers import copy_at

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RECIPE = """\
run: {name: cuda, seed: 0, device: cuda, deterministic: true}
data: {source: digits, layout: image, batch_size: 64}
model: {arch: cnn, channels: [16, 32]}
seeds: {targets: ["blocks.*.conv*"], blueprints: [residual_conv, span_conv], incubation_steps: 20, blend_steps: 20, probation_steps: 10}
policy: {trigger: periodic, period_steps: 40, growth_window: [0.05, 0.8], max_seeds: 3}
trainer: {max_steps: 240, lr: 0.003, eval_every: 20, log_every: 20}
checkpoint: {every_steps: 60, keep: 10}
telemetry: {progress: none}
"""


@pytest.mark.parametrize(("precision", "compile"), [("fp32", "none"), ("bf16", "none"), ("fp32", "default")])
def test_a_cuda_run_resumes_bit_exactly(tmp_path: Path, precision: str, compile: str) -> None:
    """Compiled too: a deterministic compiled run compiles its dormant and its grown model, at steps
    that depend on the run's state alone, so the resumed run runs compiled exactly where the whole one
    did."""
    recipe = tmp_path / "cuda.yaml"
    recipe.write_text(RECIPE, encoding="utf-8")
    whole = Trainer.from_recipe(recipe, [f"run.output_dir={tmp_path / 'runs'}", f"trainer.precision={precision}",
                                         f"storage.workspace={tmp_path / 'ws'}", f"trainer.compile={compile}"])
    summary = whole.fit()
    run_dir = Path(summary["run_dir"])
    assert summary["seeds"]["fossilized"] + summary["seeds"]["culled"] >= 1, summary["seeds"]
    copy_dir = copy_at(run_dir, tmp_path / "copy", 60)
    resumed = Trainer.resume(copy_dir, ["telemetry.progress=none"])
    resumed.fit()
    a = load_file(str(run_dir / "final" / "model.safetensors"))
    b = load_file(str(copy_dir / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
