"""Each orchestrator strategy in a short real run, and the selector's state across checkpoints and runs.

Every run is ``Trainer.from_recipe`` on the digits data (an MLP with hidden widths of 16, or a
one-block CNN on the 8x8 images) for a few hundred steps, with short lifecycles. Verdicts are
forced with ``seeds.fossilize_margin: -1`` (every seed is kept) so the topology each strategy must
produce does not depend on what a seed happened to learn. All runs share one storage workspace, so
each kernel is compiled once for the whole module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from esper_core.checkpoints import store
from esper_core.training.trainer import Trainer

BASE = """\
run: {{name: {name}, seed: 0, device: cpu}}
data: {{source: digits, layout: {layout}, batch_size: 32}}
model: {model}
seeds: {{targets: {targets}, exclude: [head], per_layer: {per_layer}, blueprints: {blueprints}, rank: 4,
        incubation_steps: 20, blend_steps: 20, probation_steps: {probation}, embargo_steps: {embargo},
        fossilize_margin: -1.0}}
policy: {{trigger: periodic, period_steps: 10, growth_window: [0.05, 0.8], max_germinations: 1, {policy}}}
trainer: {{max_steps: {steps}, lr: 0.01, eval_every: 10, log_every: 10}}
telemetry: {{progress: none}}
"""

MLP = dict(layout="flat", model="{arch: mlp, widths: [16, 16]}", targets='["type:Linear"]', per_layer=1,
           blueprints="[lowrank_adapter, wide_mlp]", probation=10, embargo=1000, steps=250, policy="")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workspace")


def _recipe(tmp_path: Path, **fields: Any) -> Path:
    path = tmp_path / f"{fields['name']}.yaml"
    path.write_text(BASE.format(**{**MLP, **fields}), encoding="utf-8")
    return path


def _fit(recipe: Path, workspace: Path, *overrides: str) -> tuple[Trainer, dict[str, Any]]:
    trainer = Trainer.from_recipe(recipe, [f"run.output_dir={recipe.parent / 'runs'}",
                                           f"storage.workspace={workspace}", *overrides])
    return trainer, trainer.fit()


def _events(run_dir: Path | str, *kinds: str) -> list[dict[str, Any]]:
    lines = (Path(run_dir) / "events.jsonl").read_text(encoding="utf-8").splitlines()
    return [e for e in map(json.loads, lines) if not kinds or e["event"] in kinds]


def _slots(trainer: Trainer) -> dict[str, list[tuple[str, str | None]]]:
    return {name: [(s.state.name, s.blueprint) for s in layer.slots] for name, layer in trainer.manager.layers.items()}


def test_replace_culls_the_weakest_live_seed_and_regrows_in_its_slot(tmp_path: Path, workspace: Path) -> None:
    recipe = _recipe(tmp_path, name="replace", model="{arch: mlp, widths: [16]}", probation=100_000, embargo=0,
                     policy="orchestrator: replace, replace_after: 60")
    trainer, summary = _fit(recipe, workspace)
    events = _events(summary["run_dir"], "germinate", "cull")
    culls = [e for e in events if e["event"] == "cull"]
    assert culls and all(e["reason"].startswith("replaced ") and "weakest live seed" in e["reason"] for e in culls)
    assert all("metric_gain" in e and "reward" in e for e in culls)
    # The only slot of the only layer alternates: germinate, (60+ steps later) replaced, germinate again.
    assert [e["event"] for e in events] == ["germinate", "cull"] * len(culls) + ["germinate"]
    assert {(e["layer"], e["slot"]) for e in events} == {("layers.0", 0)}
    assert all(later["step"] - earlier["step"] >= 60 for earlier, later in zip(events[::2], events[1::2]))
    assert "replacement chosen at the cull" in events[2]["reason"]
    (state, blueprint), = _slots(trainer)["layers.0"]
    assert state in ("BLENDING", "PROBATION") and blueprint == events[-1]["blueprint"]


def test_diversify_gives_a_layer_different_blueprints(tmp_path: Path, workspace: Path) -> None:
    recipe = _recipe(tmp_path, name="diversify", model="{arch: mlp, widths: [16]}", per_layer=2,
                     policy="orchestrator: diversify")
    trainer, summary = _fit(recipe, workspace)
    assert sorted(_slots(trainer)["layers.0"]) == [("FOSSILIZED", "lowrank_adapter"), ("FOSSILIZED", "wide_mlp")]
    second = _events(summary["run_dir"], "germinate")[1]
    assert "diversify: the layer already holds" in second["reason"]
    assert set(second["inputs"]["arms"]) == {"lowrank_adapter@linear", "wide_mlp@linear"}


def test_specialize_replicates_the_best_fossilized_blueprint(tmp_path: Path, workspace: Path) -> None:
    recipe = _recipe(tmp_path, name="specialize", per_layer=2, steps=300,
                     policy="orchestrator: specialize, selector: {prior_weight: 0}")  # untried arms first
    trainer, summary = _fit(recipe, workspace)
    germinations = _events(summary["run_dir"], "germinate")
    replicated = [e for e in germinations if "specialize replicated" in e["reason"]]
    assert replicated, [e["reason"] for e in germinations]
    champion = replicated[0]["blueprint"]
    assert all(e["blueprint"] == champion for e in replicated)
    first_kept = min(e["step"] for e in _events(summary["run_dir"], "fossilize"))
    assert all("specialize replicated" in e["reason"] for e in germinations if e["step"] > first_kept)
    for name, slots in _slots(trainer).items():  # every layer of the kind now holds the champion
        assert ("FOSSILIZED", champion) in slots, (name, slots)


def test_ensemble_grows_several_seeds_in_one_layer_at_once(tmp_path: Path, workspace: Path) -> None:
    recipe = _recipe(tmp_path, name="ensemble", layout="image", model="{arch: cnn, channels: [4]}",
                     targets='["blocks.*.conv*"]', per_layer=2, blueprints="[residual_conv, dwsep_conv]",
                     steps=200, policy="orchestrator: ensemble, ensemble_size: 2, max_seeds: 2")
    trainer, summary = _fit(recipe, workspace)
    germinations = _events(summary["run_dir"], "germinate")
    assert len(germinations) == 2
    assert {e["step"] for e in germinations} == {germinations[0]["step"]}
    layer = germinations[0]["layer"]
    assert {e["layer"] for e in germinations} == {layer} and {e["slot"] for e in germinations} == {0, 1}
    assert all("ensemble: 2 seeds germinate together" in e["reason"] for e in germinations)
    assert [s[0] for s in _slots(trainer)[layer]] == ["FOSSILIZED", "FOSSILIZED"]
    assert bool((trainer.manager.layers[layer].alpha == 1).all())  # both blended in at full weight
    assert summary["params_final"] == summary["params_initial"] + sum(e["params"] for e in germinations)


def test_thompson_run_resumes_bit_exactly(tmp_path: Path, workspace: Path) -> None:
    """The selector's private generator and the health statistics travel in the checkpoint."""
    recipe = _recipe(tmp_path, name="thompson", per_layer=2, embargo=10, steps=200,
                     policy="selector: {strategy: thompson, discount: 0.9}")
    whole, summary = _fit(recipe, workspace, "checkpoint.every_steps=100", "checkpoint.keep=5")
    run_dir = Path(summary["run_dir"])
    copy = tmp_path / "copy" / "thompson"
    shutil.copytree(run_dir, copy)
    checkpoint = copy / "checkpoints" / store.checkpoint_name(100)
    assert any(k.startswith("controller/signals/") for k in store.load(checkpoint).tensors)
    resumed = Trainer.resume(checkpoint)
    resumed.fit()
    strip = ("time", "prev", "seq", "seconds", "wall_time_s", "kernel_wait_s")  # clocks, and the chain's links

    def comparable(run: Path) -> list[dict[str, Any]]:
        def same(record: Any) -> Any:
            return {k: same(v) for k, v in record.items() if k not in strip} if isinstance(record, dict) else record
        return [same(e) for e in _events(run) if e["step"] > 100 and e["event"] not in ("run_resume", "kernels_ready")]
    assert comparable(copy) == comparable(run_dir)
    assert (copy / "final/model.safetensors").read_bytes() == (run_dir / "final/model.safetensors").read_bytes()


def test_arm_statistics_carry_over_to_the_next_run(tmp_path: Path, workspace: Path) -> None:
    shared = workspace  # the only test here that shares statistics (and the kernels are compiled already)
    recipe = _recipe(tmp_path, name="share", model="{arch: mlp, widths: [16]}", per_layer=2, steps=150,
                     policy="selector: {share_across_runs: true}")
    _, first = _fit(recipe, shared)
    stored = json.loads((shared / "selector.json").read_text())
    pulls = sum(v[3] for v in stored["arms"].values())
    assert pulls == len(_events(first["run_dir"], "fossilize", "cull")) > 0
    _, second = _fit(recipe, shared)
    assert _events(second["run_dir"], "selector_warm_start")[0]["pulls"] == pulls
    first_choice = _events(second["run_dir"], "germinate")[0]["inputs"]["arms"]
    assert sum(a["pulls"] for a in first_choice.values()) == pulls  # the first decision already knows them
    assert sum(v[3] for v in json.loads((shared / "selector.json").read_text())["arms"].values()) > pulls
