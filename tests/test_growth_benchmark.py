"""benchmarks/growth.py (v2): its statistics, S-budget's width, its FLOP count and target checks on fixed
numbers, and the recipe every arm runs accepting the overrides the arms use; benchmarks/growth_compare.py
on fixed results. No training here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from esper_core.training.models import MLP, count_parameters
from esper_core.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import growth as bench  # noqa: E402


def test_paired_t_interval_matches_the_textbook_value() -> None:
    # d = 1..5: mean 3, s = sqrt(2.5), t(0.975, 4) = 2.776445 -> half-width 1.963243
    low, high = bench.paired_t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert low == pytest.approx(3 - 1.963243, abs=1e-5)
    assert high == pytest.approx(3 + 1.963243, abs=1e-5)
    assert all(np.isnan(bench.paired_t_interval([1.0])))


def test_bootstrap_interval_is_seeded_and_near_the_normal_approximation() -> None:
    d = [1.0, 2.0, 3.0, 4.0, 5.0]
    low, high = bench.bootstrap_interval(d)
    assert (low, high) == bench.bootstrap_interval(d)  # the same resamples every run
    # the mean of 5 resampled values: sd sqrt(2)/sqrt(5) = 0.632, so about 3 -/+ 1.24
    assert 1.6 <= low <= 2.0 and 4.0 <= high <= 4.4
    assert bench.bootstrap_interval([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7))


def test_paired_differences_use_only_seeds_both_arms_have() -> None:
    out = bench.paired({0: 50.0, 1: 60.0, 2: 70.0}, {1: 58.0, 2: 65.0, 3: 1.0})
    assert out["seeds"] == [1, 2] and out["n"] == 2 and out["mean"] == pytest.approx(3.5)
    assert out["t95"][0] < 3.5 < out["t95"][1]


def test_budget_width_is_the_smallest_width_not_below_the_target() -> None:
    # inputs 64, two hidden layers of w, 10 classes: w^2 + 76 w + 10 parameters (w=40: 4,650; w=39: 4,495)
    assert bench.budget_width(64, 10, 2, 4628) == 40
    assert bench.budget_width(64, 10, 2, 4650) == 40
    assert bench.budget_width(64, 10, 2, 4651) == 41
    for target in range(6_922, 12_000, 97):  # the deep host (six hidden layers) on 40 inputs
        w = bench.budget_width(40, 10, 6, target)
        assert bench.mlp_params([40, *[w] * 6, 10]) >= target > bench.mlp_params([40, *[w - 1] * 6, 10])
    # the parameter count is what the trainer counts for the same MLP
    assert bench.mlp_params([40, 37, 37, 10]) == count_parameters(MLP(40, [37, 37], 10, 0.0))


def test_flops_count_the_host_every_step_and_each_seed_while_it_is_in_the_forward_pass() -> None:
    events = [{"event": "germinate", "step": 90, "layer": "head", "slot": 0, "blueprint": "span_linear"},
              {"event": "incubate", "step": 100, "layer": "head", "slot": 0, "blueprint": "span_linear"},
              {"event": "incubate", "step": 200, "layer": "layers.1", "slot": 0, "blueprint": "span_linear"},
              {"event": "cull", "step": 450, "layer": "layers.1", "slot": 0, "blueprint": "span_linear"},
              {"event": "fossilize", "step": 400, "layer": "head", "slot": 0, "blueprint": "span_linear"}]
    lifetimes = bench.seed_lifetimes(events, end=1000)
    assert sorted(lifetimes) == [("head", "span_linear", 100, 1000), ("layers.1", "span_linear", 200, 450)]
    host = bench.mlp_macs([40, 32, 32, 10])
    assert host == 40 * 32 + 32 * 32 + 32 * 10
    flops = bench.training_flops(host, [(336, 100, 1000), (576, 200, 450)], steps=1000, batch=128)
    assert flops == 6 * 128 * (host * 1000 + 336 * 900 + 576 * 250)


def _diff(mean: float, low: float, high: float) -> dict:
    return {"mean": mean, "t95": [low, high], "bootstrap95": [low + 0.1, high - 0.1], "n": 10}


def test_targets_are_met_or_missed_as_issue_12_states_them() -> None:
    summary = {
        "mnist1d/mlp": {"params_ratio": 0.3, "flops_ratio": 0.4, "differences": {
            "G-esper - S-budget": _diff(1.0, 0.2, 1.8), "G-esper - S-large": _diff(-0.4, -1.0, 0.2),
            "G-esper - G-random": _diff(0.1, -0.45, 0.6)}},
        "teacher/mlp": {"params_ratio": 0.6, "flops_ratio": 0.4, "differences": {
            "G-esper - S-budget": _diff(1.0, -0.2, 2.2), "G-esper - S-large": _diff(-0.2, -1.0, 0.6),
            "G-esper - G-random": _diff(0.1, -0.7, 0.9)}},
        "teacher/deep": {"params_ratio": 0.2, "flops_ratio": 0.2, "differences": {
            "G-esper - G-random": _diff(0.8, 0.05, 1.5)}},
    }
    met = {(c["where"], c["id"]): c["met"] for c in bench.targets(summary)}
    assert met[("mnist1d/mlp", "beats S-budget")] is True
    assert met[("teacher/mlp", "beats S-budget")] is False  # t interval reaches below 0
    assert met[("mnist1d/mlp", "near S-large")] is True
    assert met[("teacher/mlp", "near S-large")] is False  # 60% of S-large's params
    assert met[("mnist1d/mlp", "not below G-random")] is True
    assert met[("teacher/mlp", "not below G-random")] is False
    assert met[("teacher/deep", "beats G-random")] is True
    assert met[("mlp", "close to S-large")] is True  # mnist1d: -0.4 at 30%/40%
    assert len(met) == 8  # digits and the mnist1d deep host (not run here) decide nothing


def test_seed_list_option() -> None:
    assert bench.parse_seeds("0-9") == list(range(10))
    assert bench.parse_seeds("100-104") == [100, 101, 102, 103, 104]
    assert bench.parse_seeds("0-2,7") == [0, 1, 2, 7]


def test_growth_recipe_takes_the_arms_overrides(tmp_path: Path) -> None:
    """recipes/growth-mlp.yaml accepts file data, other widths and static/random policies; a span seed's
    multiply-adds are counted from its real kernel spec (in -> rank -> out)."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", x=rng.standard_normal((200, 12)).astype(np.float32), y=rng.integers(0, 3, 200))
    places = [f"run.output_dir={tmp_path}", f"storage.workspace={tmp_path / 'ws'}"]
    static = Trainer.from_recipe(ROOT / "recipes" / "growth-mlp.yaml", [
        "data.source=file", f"data.path={tmp_path / 'x.npz'}", "model.widths=[16,16,16]", "policy.max_seeds=0",
        *places])
    assert [layer.host.out_features for layer in static.manager.layers.values()] == [16, 16, 16, 3]
    assert static.loaded.recipe.policy.max_seeds == 0 and static.data.input_shape == (12,)
    grown = Trainer.from_recipe(ROOT / "recipes" / "growth-mlp.yaml", ["policy.random=true", *places])
    assert list(grown.manager.layers) == ["layers.0", "layers.1", "head"] and grown.loaded.recipe.policy.random
    spec = grown.controller.catalog.spec("span_linear", "head")  # widens layers.1: 32 inputs, rank 16, 10 outputs
    assert bench.seed_macs(spec.resolve(), spec.sample_shape) == 32 * 16 + 16 * 10


def test_growth_compare_pairs_two_results_by_seed_and_names_the_stronger_random_arm(tmp_path: Path, capsys) -> None:
    """benchmarks/growth_compare.py on two fixed results: G-esper new - old paired by run seed, the random
    arms compared, and the new policy measured against whichever random arm scored higher."""
    import growth_compare

    def result(esper: list[float], random: list[float]) -> dict:
        runs = [{"task": "teacher", "host": "deep", "arm": arm, "seed": seed, "test_accuracy": acc}
                for arm, accs in (("G-esper", esper), ("G-random", random)) for seed, acc in zip((3, 4, 5), accs)]
        return {"training": {"steps": 3000}, "runs": runs}

    new, old = tmp_path / "new.json", tmp_path / "old.json"
    new.write_text(json.dumps(result([0.60, 0.62, 0.61], [0.50, 0.52, 0.51])))
    old.write_text(json.dumps(result([0.59, 0.60, 0.62], [0.55, 0.56, 0.57])))
    assert growth_compare.main([str(new), str(old), "--json", str(tmp_path / "cmp.json")]) == 0
    entry = json.loads((tmp_path / "cmp.json").read_text())["comparison"]["teacher/deep"]
    assert entry["G-esper: new - old"]["mean"] == pytest.approx(100 * (0.01 + 0.02 - 0.01) / 3)
    assert entry["G-esper: new - old"]["ahead"] == 2
    assert entry["stronger G-random"] == "old"  # 56% against 51%
    assert entry["new G-esper - stronger G-random"]["mean"] == pytest.approx(100 * (0.05 + 0.06 + 0.04) / 3)
    assert capsys.readouterr().out.splitlines()[-1] == "key figure: G-esper new - old, points: teacher/deep +0.67"
    old.write_text(json.dumps(result([0.59, 0.60, 0.62], [0.55, 0.56, 0.57]) | {"training": {"steps": 600}}))
    with pytest.raises(SystemExit) as exit_info:
        growth_compare.main([str(new), str(old)])
    assert exit_info.value.code == 2 and "trained differently" in capsys.readouterr().err


def test_s_shape_is_the_grown_mlp_a_span_export_widens_to() -> None:
    """growth_shapes.py's S-shape arm: the units a G-esper record's span seeds added, and a model that
    computes what the zoo MLP widened by those units computes when the new units of consecutive hidden
    layers are not connected (the network tests/test_export_widen.py checks a grown run exports to)."""
    import growth_shapes as shapes

    record = {"inputs": 40, "outputs": 10, "widths": [32, 32], "fossilized": [
        *({"layer": "layers.1", "blueprint": "span_linear", "params": 16 * (40 + 1 + 32) + 32} for _ in range(4)),
        *({"layer": "head", "blueprint": "span_linear", "params": 16 * (32 + 1 + 10) + 10} for _ in range(3))]}
    assert shapes.added_units(record) == [64, 48]
    with pytest.raises(ValueError):
        shapes.added_units({**record, "fossilized": [{"layer": "head", "blueprint": "span_linear", "params": 700}]})
    import torch

    torch.manual_seed(0)
    grown = shapes.span_mlp((40,), 10, [32, 32], [64, 48])
    wider = MLP(40, [96, 80], 10, 0.0)
    with torch.no_grad():
        (l0, l1), head, (s0, s1) = grown.layers, grown.head, grown.spans
        wider.layers[0].weight.copy_(torch.cat([l0.weight, s0[0].weight]))
        wider.layers[0].bias.copy_(torch.cat([l0.bias, s0[0].bias]))
        w1 = torch.zeros(80, 96)
        w1[:32, :32], w1[:32, 32:], w1[32:, :32] = l1.weight, s0[2].weight, s1[0].weight
        wider.layers[1].weight.copy_(w1)
        wider.layers[1].bias.copy_(torch.cat([l1.bias, s1[0].bias]))
        wider.head.weight.copy_(torch.cat([head.weight, s1[2].weight], dim=1))
        wider.head.bias.copy_(head.bias)
        x = torch.randn(64, 40)
        assert torch.allclose(grown(x), wider(x), atol=1e-5)
    # the wider MLP less its zero block of new-to-new weights
    assert count_parameters(grown) == count_parameters(wider) - 48 * 64
    assert shapes.shape_macs(record, [64, 48]) == 40 * 96 + 96 * 80 - 48 * 64 + 80 * 10
